//! From a client transaction to SQL: every operation is checked against the catalog and its
//! values normalised before any SQL is sent, then operations are grouped into as few statements
//! as keep their meaning.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::coerce::{coerce, uuid_text};
use crate::config::{EngineConfig, PatchMissing, SetValue};
use crate::protocol::{OpKind, Operation, Transaction};
use crate::rules::{Access, Refusal};
use crate::schema::{Catalog, Kind, Table};

/// Why a client transaction is rejected, and at which of its operations.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub code: String,
    pub message: String,
    pub details: Value,
    pub operation_index: usize,
}

impl Rejection {
    pub fn new(code: &str, message: impl Into<String>, details: Value) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
            details,
            operation_index: 0,
        }
    }

    fn at(mut self, index: usize) -> Self {
        self.operation_index = index;
        self
    }
}

/// What a request is about, as far as hooks and row-level security need to know.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The verified user id (`sub`), when authentication is on.
    pub user_id: Option<String>,
    /// The verified token claims (`Value::Null` without authentication).
    pub claims: Value,
    /// The PowerSync client id, when the connector sends it.
    pub client_id: Option<String>,
}

/// Application checks that run on every operation before any SQL, in the order registered.
/// A rejection rejects the operation's transaction like a constraint violation would, with
/// the hook's own error code.
pub trait WriteHook: Send + Sync + 'static {
    fn check(&self, ctx: &Context, op: &Operation) -> Result<(), Rejection>;
}

/// One operation, resolved against the catalog, with its values as text for Postgres.
#[derive(Debug, Clone)]
pub(crate) struct RowOp {
    /// What the client may do to the table (and the client's names for messages).
    pub access: Arc<Access>,
    pub table: Arc<Table>,
    pub kind: OpKind,
    pub key: String,
    /// Column positions in `table.columns`, ascending, never the key. Server-set columns with
    /// a value from the token are among them.
    pub cols: Vec<usize>,
    pub vals: Vec<Option<String>>,
    /// Columns the database sets (`now()`), ascending, none of them in `cols`.
    pub db_cols: Vec<usize>,
    /// For a table with an owner rule: the owner column and the caller's id as its text.
    pub owner: Option<(usize, String)>,
}

/// Checks one client transaction against the catalog and the table rules, and normalises
/// its values. Everything a rule forbids is refused here, before any SQL; only ownership,
/// which depends on rows, is left to the guards (see `statement`).
pub(crate) fn prepare(
    catalog: &Catalog,
    tx: &Transaction,
    cfg: &EngineConfig,
    hooks: &[Arc<dyn WriteHook>],
    ctx: &Context,
) -> Result<Vec<RowOp>, Rejection> {
    tx.crud
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let row = resolve(catalog, op, cfg, ctx).map_err(|r| r.at(i))?;
            for hook in hooks {
                hook.check(ctx, op).map_err(|r| r.at(i))?;
            }
            Ok(row)
        })
        .collect()
}

fn unauthorized(message: String, details: Value) -> Rejection {
    Rejection::new("UNAUTHORIZED", message, details)
}

fn resolve(
    catalog: &Catalog,
    op: &Operation,
    cfg: &EngineConfig,
    ctx: &Context,
) -> Result<RowOp, Rejection> {
    let name = Shown(&op.table);
    let access = match catalog.access(&op.table) {
        Ok(a) => a.clone(),
        Err(why) => {
            let details = json!({ "table": op.table });
            let mismatch = |reason: &str| {
                Rejection::new(
                    "SCHEMA_MISMATCH",
                    format!("table {name} {reason}"),
                    details.clone(),
                )
            };
            return Err(match why {
                Refusal::Unlisted => unauthorized(
                    format!("table {name} is not writable by clients"),
                    details.clone(),
                ),
                Refusal::Missing => mismatch("is not a table crudgate exposes"),
                Refusal::NoSingleColumnKey => mismatch("has no single-column primary key"),
                Refusal::BadRule => mismatch("has a write rule that does not match the database"),
            });
        }
    };
    if !access.allows(op.op) {
        return Err(unauthorized(
            format!("{} is not allowed on table {name}", op.op.as_str()),
            json!({ "table": op.table, "op": op.op.as_str() }),
        ));
    }
    let table = access.table.clone();
    if op.op == OpKind::Put && table.insert_rules {
        return Err(Rejection::new(
            "SCHEMA_MISMATCH",
            format!(
                "table {name} has INSERT rules, where a PUT (insert or replace) cannot be applied"
            ),
            json!({ "table": op.table }),
        ));
    }
    let owner = match access.owner {
        None => None,
        Some(c) => {
            let col = &table.columns[c];
            // A user id that cannot be stored in the owner column owns no row there.
            let id = ctx
                .user_id
                .as_ref()
                .and_then(|u| coerce(&col.kind, &Value::String(u.clone()), cfg.bytea).ok())
                .flatten();
            match id {
                Some(id) => Some((c, id)),
                None => {
                    return Err(unauthorized(
                        format!("table {name} can only be written by an identified owner"),
                        json!({ "table": op.table }),
                    ))
                }
            }
        }
    };
    let pk = table.pk_column();
    let key = match key_text(&pk.kind, &op.id.0, cfg) {
        // A PUT of a key longer than a sized key column: Postgres would cut its trailing
        // spaces and land it on another row. (A PATCH or DELETE of it finds no row.)
        Some(k) if op.op != OpKind::Put || pk.max_chars.is_none_or(|n| k.chars().count() <= n) => k,
        _ => return Err(invalid(&op.table, &access, table.pk)),
    };
    let mut cols = Vec::new();
    let mut vals = Vec::new();
    let mut db_cols = Vec::new();
    if op.op != OpKind::Delete {
        let mut given: Vec<(usize, Option<String>)> = Vec::new();
        for (cname, v) in op.op_data.iter().flatten() {
            let Some(c) = access.column(cname) else {
                return Err(Rejection::new(
                    "SCHEMA_MISMATCH",
                    format!("table {name} has no column {}", shown(cname)),
                    json!({ "table": op.table, "column": cname }),
                ));
            };
            if c == table.pk {
                // Some connectors repeat the id in the data; it may not name another row.
                let same = coerce(&pk.kind, v, cfg.bytea).ok().flatten().as_deref() == Some(&key);
                if !same {
                    return Err(Rejection::new(
                        "INVALID_DATA",
                        format!(
                            "{} in the data of table {name} differs from the operation's id",
                            shown(cname),
                        ),
                        json!({ "table": op.table, "column": cname }),
                    ));
                }
                continue;
            }
            if access.server_set(c).is_some() {
                // The server's value replaces the client's (a PUT sends every non-null column
                // of the local row, so the client's copy of e.g. owner_id arrives every time).
                continue;
            }
            if !table.columns[c].writable {
                return Err(Rejection::new(
                    "SCHEMA_MISMATCH",
                    format!(
                        "column {} of table {name} is generated and cannot be written",
                        shown(cname),
                    ),
                    json!({ "table": op.table, "column": cname }),
                ));
            }
            if !access.may_write(c) {
                return Err(unauthorized(
                    format!("column {} of table {name} is not writable", shown(cname)),
                    json!({ "table": op.table, "column": cname }),
                ));
            }
            let col = &table.columns[c];
            let text =
                coerce(&col.kind, v, cfg.bytea).map_err(|_| invalid(&op.table, &access, c))?;
            given.push((c, text));
        }
        // An empty PATCH stays a no-op: refreshing `now()` columns alone would turn a
        // client's "nothing changed" into a change.
        let touches = op.op == OpKind::Put || !given.is_empty();
        for (c, source) in &access.set {
            match (op.op, source) {
                (OpKind::Put, SetValue::Claim(path)) => {
                    let col = &table.columns[*c];
                    let value = claim(&ctx.claims, path).ok_or_else(|| {
                        unauthorized(
                            format!(
                                "table {name} needs the token claim {:?}, which it lacks",
                                path.join(".")
                            ),
                            json!({ "table": op.table, "claim": path.join(".") }),
                        )
                    })?;
                    let text = coerce(&col.kind, value, cfg.bytea).map_err(|_| {
                        unauthorized(
                            format!(
                                "the token claim {:?} does not fit table {name}",
                                path.join(".")
                            ),
                            json!({ "table": op.table, "claim": path.join(".") }),
                        )
                    })?;
                    given.push((*c, text));
                }
                // On PATCH a claim column keeps its value: a PATCH may not re-own a row.
                (OpKind::Patch, SetValue::Claim(_)) => {}
                (OpKind::Put | OpKind::Patch, SetValue::Now) if touches => db_cols.push(*c),
                _ => {}
            }
        }
        given.sort_by_key(|(c, _)| *c);
        for (c, text) in given {
            cols.push(c);
            vals.push(text);
        }
    }
    Ok(RowOp {
        access,
        table,
        kind: op.op,
        key,
        cols,
        vals,
        db_cols,
        owner,
    })
}

/// A row id as the key column's text: uuid and text keys directly, others through `coerce`.
fn key_text(kind: &Kind, id: &str, cfg: &EngineConfig) -> Option<String> {
    match kind {
        Kind::Text => Some(id.to_owned()),
        Kind::Uuid => uuid_text(id).ok(),
        _ => coerce(kind, &Value::String(id.to_owned()), cfg.bytea)
            .ok()
            .flatten(),
    }
}

/// A claim by its path; null counts as absent.
fn claim<'v>(claims: &'v Value, path: &[String]) -> Option<&'v Value> {
    let mut v = claims;
    for p in path {
        v = v.get(p)?;
    }
    (!v.is_null()).then_some(v)
}

/// A value that does not fit column `c`, in the client's names.
fn invalid(client_table: &str, access: &Access, c: usize) -> Rejection {
    let column = access.client_name(c);
    let type_name = &access.table.columns[c].type_name;
    Rejection::new(
        "INVALID_DATA",
        format!(
            "invalid value for column {}.{}: expected {}",
            shown(client_table),
            shown(column),
            type_name
        ),
        json!({ "table": client_table, "column": column, "expected_type": type_name }),
    )
}

/// A client-supplied name as it may appear in a message: quoted, escaped, bounded.
fn shown(name: &str) -> String {
    Shown(name).to_string()
}

/// `shown`, formatted only when a message is built (resolving an operation names its table in
/// every refusal but should not pay for it on success).
struct Shown<'a>(&'a str);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cut: String = self.0.chars().take(64).collect();
        let ell = if cut.len() < self.0.len() { "…" } else { "" };
        write!(f, "{cut:?}{ell}")
    }
}

/// Which operation of which transaction (positions in the request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpRef {
    pub tx: usize,
    pub op: usize,
}

/// A statement parameter: values travel as text (and text arrays) and are cast in SQL, except
/// in bulk statements, where columns whose values crudgate has already parsed travel as typed
/// binary arrays (see `column_array`).
#[derive(Debug, Clone)]
pub(crate) enum Param<'a> {
    Text(Option<String>),
    Texts(Vec<Option<String>>),
    /// Values borrowed from the request's operations (bulk statements copy nothing).
    Refs(Vec<Option<&'a str>>),
    /// Which rows of a merged PATCH set a column.
    Bools(Vec<bool>),
    Flags(Vec<Option<bool>>),
    Ints(Vec<Option<i64>>),
    Uuids(Vec<Option<uuid::Uuid>>),
    Times(Vec<Option<chrono::DateTime<chrono::Utc>>>),
    /// One value of the forms above, for a one-row statement (see `Param::first`).
    Ref(Option<&'a str>),
    Flag(Option<bool>),
    Int(Option<i64>),
    Uuid(Option<uuid::Uuid>),
    Time(Option<chrono::DateTime<chrono::Utc>>),
}

impl Param<'_> {
    pub fn as_sql(&self) -> &(dyn tokio_postgres::types::ToSql + Sync) {
        match self {
            Param::Text(t) => t,
            Param::Texts(t) => t,
            Param::Refs(t) => t,
            Param::Bools(b) => b,
            Param::Flags(b) => b,
            Param::Ints(i) => i,
            Param::Uuids(u) => u,
            Param::Times(t) => t,
            Param::Ref(t) => t,
            Param::Flag(b) => b,
            Param::Int(i) => i,
            Param::Uuid(u) => u,
            Param::Time(t) => t,
        }
    }

    /// An array parameter's first element, as the same type's single value.
    fn first(self) -> Self {
        fn head<T: Copy>(v: Vec<Option<T>>) -> Option<T> {
            v.into_iter().next().flatten()
        }
        match self {
            Param::Texts(t) => Param::Text(t.into_iter().next().flatten()),
            Param::Refs(t) => Param::Ref(head(t)),
            Param::Bools(b) => Param::Flag(b.first().copied()),
            Param::Flags(b) => Param::Flag(head(b)),
            Param::Ints(i) => Param::Int(head(i)),
            Param::Uuids(u) => Param::Uuid(head(u)),
            Param::Times(t) => Param::Time(head(t)),
            single => single,
        }
    }
}

/// One column's values as an array parameter for `unnest`, with the array's element type.
///
/// Typed (binary) where `coerce` has already checked and normalised the values, so Postgres
/// skips the text input functions (measured: a fifth of a 10,000-row bulk insert's time);
/// text, cast in SQL, for every other type and outside the fast path, so that the exact path
/// reports errors as Postgres words them. A timestamp Postgres would round (sub-microsecond
/// digits) or that is far from the common range keeps the text form.
fn column_array<'a>(
    kind: &Kind,
    vals: Vec<Option<&'a str>>,
    typed: bool,
) -> (Param<'a>, &'static str) {
    fn all<T>(vals: &[Option<&str>], f: impl Fn(&str) -> Option<T>) -> Option<Vec<Option<T>>> {
        vals.iter()
            .map(|v| match v {
                None => Some(None),
                Some(s) => f(s).map(Some),
            })
            .collect()
    }
    let typed_param = || match kind {
        Kind::Uuid => {
            all(&vals, |s| uuid::Uuid::try_parse(s).ok()).map(|v| (Param::Uuids(v), "uuid"))
        }
        Kind::Bool => all(&vals, |s| match s {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        })
        .map(|v| (Param::Flags(v), "bool")),
        Kind::Int { .. } => all(&vals, |s| s.parse::<i64>().ok()).map(|v| (Param::Ints(v), "int8")),
        Kind::Timestamptz => all(&vals, |s| {
            use chrono::{Datelike, Timelike};
            let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
            let plain = t.nanosecond() % 1000 == 0 && (1..=9999).contains(&t.year());
            plain.then(|| t.with_timezone(&chrono::Utc))
        })
        .map(|v| (Param::Times(v), "timestamptz")),
        _ => None,
    };
    match typed.then(typed_param).flatten() {
        Some(p) => p,
        None => (Param::Refs(vals), "text"),
    }
}

/// One UPDATE for PATCHes of different column sets: each column of their union is set from the
/// row's value where that row's PATCH names it (a mask per column) and to itself elsewhere.
fn masked_patch<'a>(
    group: &[(OpRef, &'a RowOp)],
    (keys, key_elem): (Param<'a>, &'static str),
    owner: Option<(&crate::schema::Column, &String)>,
    ops: Vec<OpRef>,
    cfg: &EngineConfig,
    typed: bool,
) -> Stmt<'a> {
    let first = group[0].1;
    let t = &first.table;
    let pk = t.pk_column();
    let mut union: Vec<usize> = group
        .iter()
        .flat_map(|(_, o)| o.cols.iter().copied())
        .collect();
    union.sort_unstable();
    union.dedup();
    let mut params = Vec::with_capacity(2 * union.len() + 2);
    let mut elems = Vec::with_capacity(union.len());
    params.push(keys);
    for &c in &union {
        let (vals, mask): (Vec<Option<&str>>, Vec<bool>) = group
            .iter()
            .map(|(_, o)| match o.cols.iter().position(|&x| x == c) {
                Some(i) => (o.vals[i].as_deref(), true),
                None => (None, false),
            })
            .unzip();
        let (vals, elem) = column_array(&t.columns[c].kind, vals, typed);
        params.push(vals);
        params.push(Param::Bools(mask));
        elems.push(elem);
    }
    let mut sql = format!("update {} as _cg_t set ", t.ident);
    for (j, &c) in union.iter().enumerate() {
        let col = &t.columns[c];
        let _ = write!(
            sql,
            "{}{c} = case when _cg_v.m{j} then _cg_v.v{j}::{ty} else _cg_t.{c} end",
            if j > 0 { ", " } else { "" },
            c = col.ident,
            ty = col.type_sql
        );
    }
    for &c in &first.db_cols {
        let _ = write!(sql, ", {} = now()", t.columns[c].ident);
    }
    let _ = write!(sql, " from unnest($1::{key_elem}[]");
    for (j, elem) in elems.iter().enumerate() {
        let _ = write!(sql, ", ${}::{elem}[], ${}::bool[]", 2 * j + 2, 2 * j + 3);
    }
    sql.push_str(") as _cg_v(k");
    for j in 0..union.len() {
        let _ = write!(sql, ", v{j}, m{j}");
    }
    let _ = write!(sql, ") where _cg_t.{} = _cg_v.k::{}", pk.ident, pk.type_sql);
    if let Some((col, id)) = owner {
        params.push(Param::Text(Some(id.clone())));
        let _ = write!(
            sql,
            " and _cg_t.{} = ${}::text::{}",
            col.ident,
            params.len(),
            col.type_sql
        );
    }
    let expect = match cfg.patch_missing {
        PatchMissing::Reject => Expect::Rows(group.len() as u64),
        PatchMissing::Ignore => Expect::Any,
    };
    Stmt {
        sql,
        params,
        ops,
        expect,
    }
}

/// What a statement's outcome must be for its operations to stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// Anything but an error.
    Any,
    /// At least this many rows touched, else `ROW_NOT_FOUND` (PATCH when a missing row is
    /// rejected). Checked before COMMIT, which then leaves the pipeline.
    Rows(u64),
    /// An ownership guard: it fails (division by zero) when one of its rows belongs to
    /// someone else, which means `UNAUTHORIZED` for its operations.
    Guard,
}

/// One SQL statement over one or more rows, with its parameters.
#[derive(Debug)]
pub(crate) struct Stmt<'a> {
    pub sql: String,
    pub params: Vec<Param<'a>>,
    /// The operations it applies; empty for crudgate's own bookkeeping (ledger, rejections).
    pub ops: Vec<OpRef>,
    pub expect: Expect,
}

/// Statements per operation, in order (the exact path, and the naive planner). An empty PATCH
/// needs no statement unless missing rows are rejected.
pub(crate) fn one_per_op<'a>(tx: usize, ops: &'a [RowOp], cfg: &EngineConfig) -> Vec<Stmt<'a>> {
    ops.iter()
        .enumerate()
        .filter(|(_, op)| !is_noop(op, cfg))
        .flat_map(|(i, op)| statement(&[(OpRef { tx, op: i }, op)], cfg, false))
        .collect()
}

/// An empty PATCH when missing rows are no error and nobody's ownership is to be checked:
/// nothing to check, nothing to change. (A PATCH of only the owner column is empty once the
/// server-set column is dropped; of another user's row, it is still refused.)
fn is_noop(op: &RowOp, cfg: &EngineConfig) -> bool {
    op.kind == OpKind::Patch
        && op.cols.is_empty()
        && op.owner.is_none()
        && cfg.patch_missing == PatchMissing::Ignore
}

/// Groups the operations of several transactions into bulk statements. Only valid when all of
/// them are to be applied (the caller falls back to `one_per_op` on any failure).
///
/// Operations join one statement when they are of one table, op and column set, and name
/// distinct rows. Without regrouping, only neighbours join, and only within one transaction:
/// a multi-row statement checks its foreign keys and runs its triggers' checks once all its
/// rows are in, so one transaction's row could satisfy another's reference to it (applied in
/// turn, the first would fail). For a table whose rows commute
/// (see `Table::rows_commute`), any run of operations on distinct rows of that table is
/// regrouped by op and column set, which turns a randomly interleaved run into a handful of
/// statements without changing the result. A PUT that takes a volatile default (a serial
/// number) is not moved ahead of an earlier operation, so its rows keep the client's order.
pub(crate) fn bulk<'a>(
    ops: impl Iterator<Item = (OpRef, &'a RowOp)>,
    cfg: &EngineConfig,
) -> Vec<Stmt<'a>> {
    let mut out = Vec::new();
    let mut window: Vec<Vec<(OpRef, &RowOp)>> = Vec::new();
    let mut keys: HashSet<&str> = HashSet::new();
    let mut last_tx = None;
    let flush = |window: &mut Vec<Vec<(OpRef, &'a RowOp)>>, out: &mut Vec<Stmt<'a>>| {
        for group in window.drain(..) {
            out.extend(statement(&group, cfg, true));
        }
    };
    for (at, op) in ops {
        if is_noop(op, cfg) {
            continue;
        }
        // One client table, not just one server table: two client names for one table can
        // have different rules (an owner, say), and a statement follows its first op's rule.
        let same_table = window
            .first()
            .is_some_and(|g| Arc::ptr_eq(&g[0].1.access, &op.access));
        let other_tx = last_tx.is_some_and(|tx| tx != at.tx) && !op.table.rows_commute;
        // Such a PUT may still join the last group (its rows are inserted in order), but no
        // earlier one.
        let commutes = op.table.rows_commute && !draws_volatile_default(op);
        last_tx = Some(at.tx);
        if !same_table || other_tx || keys.contains(op.key.as_str()) || !canonical_key(&op.table) {
            flush(&mut window, &mut out);
            keys.clear();
        }
        keys.insert(op.key.as_str());
        let fits = |g: &Vec<(OpRef, &RowOp)>| {
            let f = g[0].1;
            f.kind == op.kind
                && f.owner == op.owner
                && f.db_cols == op.db_cols
                && (f.cols == op.cols
                    // PATCHes of other column sets merge into one masked UPDATE, where the
                    // rows commute (no trigger can tell a column set to itself).
                    || (commutes
                        && op.kind == OpKind::Patch
                        && !op.cols.is_empty()
                        && !f.cols.is_empty()))
        };
        let slot = if commutes {
            window.iter_mut().find(|g| fits(g))
        } else {
            window.last_mut().filter(|g| fits(g))
        };
        match slot {
            Some(g) => g.push((at, op)),
            None => window.push(vec![(at, op)]),
        }
    }
    flush(&mut window, &mut out);
    out
}

/// Whether a PUT leaves out a column whose default depends on when the row is inserted: such
/// PUTs must be inserted in the client's order (a serial number is the order of the rows).
fn draws_volatile_default(op: &RowOp) -> bool {
    op.kind == OpKind::Put
        && op.table.columns.iter().enumerate().any(|(i, c)| {
            c.volatile_default
                && i != op.table.pk
                && !op.cols.contains(&i)
                && !op.db_cols.contains(&i)
        })
}

/// Whether equal rows always have equal key text (as the planner's distinct-row check assumes).
/// Not so for citext, char(n), domains or text under a nondeterministic collation, whose
/// different spellings can name one row: in one bulk UPDATE, only one of two such PATCHes
/// would apply. Their operations are not grouped.
fn canonical_key(t: &Table) -> bool {
    let pk = t.pk_column();
    pk.deterministic
        && (matches!(pk.kind, Kind::Uuid | Kind::Int { .. })
            || matches!(pk.type_sql.as_str(), "text" | "character varying"))
}

/// The statements for a group of same-shaped operations on distinct rows of one table: the
/// ownership guard when the table has an owner rule, then the statement itself.
///
/// Ownership is enforced twice. The guard names the offence: it reads the group's rows that
/// exist and belong to someone else (or no one) and fails if there is any, so the fast path
/// falls back and the exact path names the operation, with COMMIT still in the pipeline (a
/// row count would have to be read before COMMIT, costing a round trip). The statement
/// itself is also restricted to the caller's rows, so a row whose owner changes between guard
/// and statement (another transaction committing in between) is still never touched.
fn statement<'a>(group: &[(OpRef, &'a RowOp)], cfg: &EngineConfig, typed: bool) -> Vec<Stmt<'a>> {
    let Some((_, first)) = group.first() else {
        return Vec::new();
    };
    let t = &first.table;
    let pk = t.pk_column();
    let n = group.len();
    // An empty PATCH reaches here only when missing rows are rejected (see `is_noop`).
    let empty_patch = first.kind == OpKind::Patch && first.cols.is_empty();
    let refs: Vec<OpRef> = group.iter().map(|(r, _)| *r).collect();
    let keys = group.iter().map(|(_, o)| Some(o.key.as_str())).collect();
    let (key_param, key_elem) = column_array(&pk.kind, keys, typed);
    let mut out = Vec::with_capacity(2);
    let owner = first.owner.as_ref().map(|(c, id)| (&t.columns[*c], id));
    if let Some((col, id)) = owner {
        out.push(Stmt {
            sql: format!(
                "select 1 / (count(*) = 0)::int from {} where {} = any($1::{key_elem}[]::{}[]) \
                 and {} is distinct from $2::text::{}",
                t.ident, pk.ident, pk.type_sql, col.ident, col.type_sql
            ),
            params: vec![key_param.clone(), Param::Text(Some(id.clone()))],
            ops: refs.clone(),
            expect: Expect::Guard,
        });
    }
    if first.kind == OpKind::Patch && group.iter().any(|(_, o)| o.cols != first.cols) {
        out.push(masked_patch(
            group,
            (key_param, key_elem),
            owner,
            refs,
            cfg,
            typed,
        ));
        return out;
    }
    let mut params: Vec<Param<'a>> = Vec::with_capacity(first.cols.len() + 2);
    let mut elems = Vec::with_capacity(first.cols.len() + 1);
    params.push(key_param);
    elems.push(key_elem);
    for (c, &col) in first.cols.iter().enumerate() {
        let vals = group.iter().map(|(_, o)| o.vals[c].as_deref()).collect();
        let (p, elem) = column_array(&t.columns[col].kind, vals, typed);
        params.push(p);
        elems.push(elem);
    }
    let arrays = params.len();
    // One row names its values directly instead of through `unnest`: a single-row transaction
    // costs Postgres about 10 % less that way (measured: `insert … select $1, …` against
    // `unnest` of one-element arrays, 1,000 single-row transactions, fsync off).
    let one_row = n == 1 && first.kind != OpKind::Delete && !empty_patch;
    if one_row {
        params = params.into_iter().map(Param::first).collect();
    }
    let value = |i: usize| {
        if one_row {
            format!("${}::{}", i + 1, elems[i])
        } else {
            format!("v{i}")
        }
    };
    // The caller's id, compared with the owner column, comes after the arrays (a PUT compares
    // with `excluded` instead, and an unused parameter would have no type).
    let owner_param = owner.map(|(col, id)| {
        if first.kind != OpKind::Put {
            params.push(Param::Text(Some(id.clone())));
        }
        (col, arrays + 1)
    });
    let mut sql = String::new();
    let mut expect = Expect::Any;
    let unnest = |sql: &mut String| {
        if one_row {
            return;
        }
        sql.push_str(" from unnest(");
        for (i, elem) in elems.iter().enumerate() {
            let _ = write!(sql, "{}${}::{elem}[]", if i > 0 { ", " } else { "" }, i + 1);
        }
        sql.push_str(") as _cg_v(");
        for i in 0..arrays {
            let _ = write!(sql, "{}v{i}", if i > 0 { ", " } else { "" });
        }
        sql.push(')');
    };
    // `c = value, …` of an UPDATE: the operations' columns, then the database-set ones.
    let set_list = |sql: &mut String| {
        for (i, &c) in first.cols.iter().enumerate() {
            let col = &t.columns[c];
            let _ = write!(
                sql,
                "{}{} = {}::{}",
                if i > 0 { ", " } else { "" },
                col.ident,
                value(i + 1),
                col.type_sql
            );
        }
        for (i, &c) in first.db_cols.iter().enumerate() {
            let sep = if i + first.cols.len() > 0 { ", " } else { "" };
            let _ = write!(sql, "{sep}{} = now()", t.columns[c].ident);
        }
    };
    let key_match = format!("{}::{}", value(0), pk.type_sql);
    // `insert … select <values> [from unnest(…)]` of a PUT.
    let insert_sql = |sql: &mut String| {
        let _ = write!(sql, "insert into {} as _cg_t ({}", t.ident, pk.ident);
        for &c in first.cols.iter().chain(&first.db_cols) {
            let _ = write!(sql, ", {}", t.columns[c].ident);
        }
        let _ = write!(sql, ") select {key_match}");
        for (i, &c) in first.cols.iter().enumerate() {
            let _ = write!(sql, ", {}::{}", value(i + 1), t.columns[c].type_sql);
        }
        for _ in &first.db_cols {
            sql.push_str(", now()");
        }
        unnest(sql);
    };
    match first.kind {
        OpKind::Put if !t.upserts => {
            // No ON CONFLICT on this table (its key is deferrable, or it has INSERT or UPDATE
            // rules): the rows that exist are updated, then the others inserted.
            if !(first.cols.is_empty() && first.db_cols.is_empty()) {
                let mut update = format!("update {} as _cg_t set ", t.ident);
                set_list(&mut update);
                unnest(&mut update);
                let _ = write!(update, " where _cg_t.{} = {key_match}", pk.ident);
                // The owner column is server-set, so among the PUT's columns (the guard
                // refuses another's row anyway).
                let owner_at = owner_param.and_then(|(col, _)| {
                    let at = first
                        .cols
                        .iter()
                        .position(|&c| t.columns[c].ident == col.ident);
                    at.map(|at| (col, at))
                });
                if let Some((col, at)) = owner_at {
                    let _ = write!(
                        update,
                        " and _cg_t.{} = {}::{}",
                        col.ident,
                        value(at + 1),
                        col.type_sql
                    );
                }
                out.push(Stmt {
                    sql: update,
                    params: params.clone(),
                    ops: refs.clone(),
                    expect: Expect::Any,
                });
            }
            insert_sql(&mut sql);
            let _ = write!(
                sql,
                " where not exists (select 1 from {} as _cg_e where _cg_e.{} = {key_match})",
                t.ident, pk.ident
            );
        }
        OpKind::Put => {
            insert_sql(&mut sql);
            let _ = write!(sql, " on conflict ({}) do ", pk.ident);
            if first.cols.is_empty() && first.db_cols.is_empty() {
                sql.push_str("nothing");
            } else {
                sql.push_str("update set ");
                for (i, &c) in first.cols.iter().chain(&first.db_cols).enumerate() {
                    let col = &t.columns[c].ident;
                    let _ = write!(
                        sql,
                        "{}{col} = excluded.{col}",
                        if i > 0 { ", " } else { "" }
                    );
                }
                if let Some((col, _)) = owner_param {
                    // The owner column is server-set, so `excluded` holds the caller's id.
                    let _ = write!(sql, " where _cg_t.{0} = excluded.{0}", col.ident);
                }
            }
        }
        OpKind::Patch if empty_patch && cfg.patch_missing == PatchMissing::Ignore => {
            // Reached only for an owner's check, which is the guard above.
            return out;
        }
        OpKind::Patch if empty_patch => {
            // Missing rows are rejected: count the rows that exist.
            let _ = write!(
                sql,
                "select 1 from {} where {} = any($1::{}[]::{}[])",
                t.ident, pk.ident, key_elem, pk.type_sql
            );
            params.truncate(1);
            expect = Expect::Rows(n as u64);
        }
        OpKind::Patch => {
            let _ = write!(sql, "update {} as _cg_t set ", t.ident);
            set_list(&mut sql);
            unnest(&mut sql);
            let _ = write!(sql, " where _cg_t.{} = {key_match}", pk.ident);
            if let Some((col, p)) = owner_param {
                let _ = write!(
                    sql,
                    " and _cg_t.{} = ${p}::text::{}",
                    col.ident, col.type_sql
                );
            }
            if cfg.patch_missing == PatchMissing::Reject {
                expect = Expect::Rows(n as u64);
            }
        }
        OpKind::Delete => {
            let _ = write!(
                sql,
                "delete from {} where {} = any($1::{}[]::{}[])",
                t.ident, pk.ident, key_elem, pk.type_sql
            );
            if let Some((col, p)) = owner_param {
                let _ = write!(sql, " and {} = ${p}::text::{}", col.ident, col.type_sql);
            }
        }
    }
    out.push(Stmt {
        sql,
        params,
        ops: refs,
        expect,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TableRule;
    use crate::rules;

    /// Three operations of one kind by one owner, on an owned table.
    fn owned(kind: OpKind) -> Vec<RowOp> {
        let table = Arc::new(Table::of_text_columns("lists", &["id", "name", "owner_id"]));
        let rule = TableRule {
            owner: Some("owner_id".into()),
            ..TableRule::default()
        };
        let access = Arc::new(rules::resolve("lists", &rule, table.clone()).expect("rule fits"));
        (0..3)
            .map(|i| {
                let (cols, vals) = match kind {
                    OpKind::Put => (vec![1, 2], vec![Some("n".into()), Some("alice".into())]),
                    OpKind::Patch => (vec![1], vec![Some("n".into())]),
                    OpKind::Delete => (vec![], vec![]),
                };
                RowOp {
                    access: access.clone(),
                    table: table.clone(),
                    kind,
                    key: format!("row-{i}"),
                    cols,
                    vals,
                    db_cols: Vec::new(),
                    owner: Some((2, "alice".into())),
                }
            })
            .collect()
    }

    fn planned(ops: &[RowOp]) -> Vec<Stmt<'_>> {
        let refs = ops
            .iter()
            .enumerate()
            .map(|(op, row)| (OpRef { tx: 0, op }, row));
        bulk(refs, &EngineConfig::default())
    }

    /// Interleaved operations on distinct rows of a table whose rows commute.
    fn interleaved() -> Vec<RowOp> {
        let table = Arc::new(Table::of_text_columns("todos", &["id", "a", "b", "c"]));
        let access = Arc::new(
            rules::resolve("todos", &TableRule::default(), table.clone()).expect("rule fits"),
        );
        let op = |i: usize, kind: OpKind, cols: Vec<usize>| RowOp {
            access: access.clone(),
            table: table.clone(),
            kind,
            key: format!("row-{i}"),
            vals: cols.iter().map(|c| Some(format!("v{c}"))).collect(),
            cols,
            db_cols: Vec::new(),
            owner: None,
        };
        vec![
            op(0, OpKind::Put, vec![1, 2, 3]),
            op(1, OpKind::Patch, vec![1]),
            op(2, OpKind::Delete, vec![]),
            op(3, OpKind::Put, vec![1, 2, 3]),
            op(4, OpKind::Patch, vec![2, 3]),
            op(5, OpKind::Patch, vec![1]),
            op(6, OpKind::Delete, vec![]),
            op(7, OpKind::Patch, vec![3]),
        ]
    }

    #[test]
    fn interleaved_operations_on_commuting_rows_become_one_statement_per_op_kind() {
        let ops = interleaved();
        let stmts = planned(&ops);
        assert_eq!(
            stmts.len(),
            3,
            "{:#?}",
            stmts.iter().map(|s| &s.sql).collect::<Vec<_>>()
        );
        let ops = |s: &Stmt| s.ops.iter().map(|r| r.op).collect::<Vec<_>>();
        assert_eq!(ops(&stmts[0]), vec![0, 3]);
        assert_eq!(ops(&stmts[1]), vec![1, 4, 5, 7]);
        assert!(
            stmts[1].sql.contains("case when"),
            "masked: {}",
            stmts[1].sql
        );
        assert_eq!(ops(&stmts[2]), vec![2, 6]);
    }

    #[test]
    fn a_repeated_row_ends_the_regrouping_window_so_order_is_kept() {
        let mut ops = interleaved();
        ops[7].key = "row-1".into();
        let stmts = planned(&ops);
        let last = stmts.last().expect("statements");
        assert_eq!(last.ops.iter().map(|r| r.op).collect::<Vec<_>>(), vec![7]);
    }

    #[test]
    fn an_owned_group_gets_one_pipelined_guard_and_stays_one_statement() {
        for kind in [OpKind::Put, OpKind::Patch, OpKind::Delete] {
            let ops = owned(kind);
            let stmts = planned(&ops);
            assert_eq!(stmts.len(), 2, "{kind:?}: guard + statement");
            assert_eq!(stmts[0].expect, Expect::Guard);
            assert_eq!(stmts[0].ops.len(), 3);
            assert!(stmts[0].sql.contains("is distinct from"));
            // No row count to read before COMMIT: COMMIT stays in the same pipeline, so
            // ownership costs no round trip.
            assert!(stmts.iter().all(|s| !matches!(s.expect, Expect::Rows(_))));
            // The statement itself only touches the caller's rows.
            assert!(stmts[1].sql.contains("\"owner_id\""), "{}", stmts[1].sql);
        }
    }

    #[test]
    fn a_put_on_an_owned_table_never_updates_a_row_of_another_owner() {
        let ops = owned(OpKind::Put);
        let stmts = planned(&ops);
        assert!(stmts[1]
            .sql
            .ends_with("where _cg_t.\"owner_id\" = excluded.\"owner_id\""));
        // Every parameter is used (an unused one would have no type).
        assert_eq!(stmts[1].params.len(), 3);
    }

    #[test]
    fn an_unowned_table_gets_no_guard() {
        let mut ops = owned(OpKind::Patch);
        for op in &mut ops {
            op.owner = None;
        }
        let stmts = planned(&ops);
        assert_eq!(stmts.len(), 1);
        assert_eq!(stmts[0].expect, Expect::Any);
    }

    #[test]
    fn where_rows_do_not_commute_transactions_never_share_a_statement() {
        let puts = |commute: bool| {
            let mut ops = interleaved();
            ops.retain(|o| o.kind == OpKind::Put);
            let mut table = (*ops[0].table).clone();
            table.rows_commute = commute;
            let table = Arc::new(table);
            for o in &mut ops {
                o.table = table.clone();
            }
            ops
        };
        let in_two_txs = |ops: &[RowOp]| {
            let refs = ops
                .iter()
                .enumerate()
                .map(|(i, row)| (OpRef { tx: i, op: 0 }, row));
            bulk(refs, &EngineConfig::default()).len()
        };
        assert_eq!(in_two_txs(&puts(true)), 1);
        assert_eq!(
            in_two_txs(&puts(false)),
            2,
            "one transaction's row must not satisfy another's reference"
        );
    }

    #[test]
    fn puts_drawing_a_serial_keep_their_order_and_still_share_a_statement_across_transactions() {
        // Column `c` numbers rows by default: PUTs that leave it out are not moved ahead of
        // earlier ones, but neighbours, in one transaction or several, still share a statement.
        let mut ops = interleaved();
        ops.retain(|o| o.kind == OpKind::Put);
        let mut table = (*ops[0].table).clone();
        table.columns[3].volatile_default = true;
        let table = Arc::new(table);
        let put = |i: usize, cols: Vec<usize>| RowOp {
            table: table.clone(),
            key: format!("row-{i}"),
            vals: cols.iter().map(|c| Some(format!("v{c}"))).collect(),
            cols,
            ..ops[0].clone()
        };
        let ops = [
            put(0, vec![1]),
            put(1, vec![1]),
            put(2, vec![1, 2]),
            put(3, vec![1]),
            put(4, vec![1]),
        ];
        let refs = ops
            .iter()
            .enumerate()
            .map(|(i, row)| (OpRef { tx: i, op: 0 }, row));
        let stmts = bulk(refs, &EngineConfig::default());
        let rows: Vec<Vec<usize>> = stmts
            .iter()
            .map(|s| s.ops.iter().map(|r| r.tx).collect())
            .collect();
        assert_eq!(rows, vec![vec![0, 1], vec![2], vec![3, 4]]);
    }

    #[test]
    fn a_lone_row_names_its_values_directly_and_more_rows_go_through_unnest() {
        for kind in [OpKind::Put, OpKind::Patch] {
            let ops = owned(kind);
            let one = planned(&ops[..1]);
            let stmt = one.last().expect("a statement");
            assert!(!stmt.sql.contains("unnest"), "{}", stmt.sql);
            assert!(
                stmt.params
                    .iter()
                    .all(|p| matches!(p, Param::Ref(_) | Param::Text(_))),
                "{kind:?}: one value per parameter: {:?}",
                stmt.params
            );
            let many = planned(&ops);
            assert!(many[1].sql.contains("unnest"), "{}", many[1].sql);
        }
    }

    #[test]
    fn operations_of_different_owners_never_share_a_statement() {
        // A statement's guard and conflict rule carry one owner (a group commit can bring
        // several callers' operations together).
        let mut ops = owned(OpKind::Patch);
        ops[1].owner = Some((2, "mallory".into()));
        let stmts = planned(&ops);
        assert!(stmts.len() >= 4, "a guard and an update per owner");
        for s in &stmts {
            let owners: HashSet<_> = s.ops.iter().map(|r| &ops[r.op].owner).collect();
            assert_eq!(owners.len(), 1, "{}", s.sql);
        }
    }
}
