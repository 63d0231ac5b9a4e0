//! From a client transaction to SQL: every operation is checked against the catalog and its
//! values normalised before any SQL is sent, then operations are grouped into as few statements
//! as keep their meaning.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::coerce::coerce;
use crate::config::{EngineConfig, PatchMissing};
use crate::protocol::{OpKind, Operation, Transaction};
use crate::schema::{Catalog, Table, Unwritable};

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
    pub table: Arc<Table>,
    pub kind: OpKind,
    pub key: String,
    /// Column positions in `table.columns`, ascending, never the key.
    pub cols: Vec<usize>,
    pub vals: Vec<Option<String>>,
}

/// Checks one client transaction against the catalog and normalises its values.
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
            let row = resolve(catalog, op, cfg).map_err(|r| r.at(i))?;
            for hook in hooks {
                hook.check(ctx, op).map_err(|r| r.at(i))?;
            }
            Ok(row)
        })
        .collect()
}

fn resolve(catalog: &Catalog, op: &Operation, cfg: &EngineConfig) -> Result<RowOp, Rejection> {
    let table = match catalog.table(&op.table) {
        Ok(t) => t.clone(),
        Err(why) => {
            let reason = match why {
                Some(Unwritable::NoSingleColumnKey) => "has no single-column primary key",
                None => "is not a table crudgate exposes",
            };
            return Err(Rejection::new(
                "SCHEMA_MISMATCH",
                format!("table {} {reason}", shown(&op.table)),
                json!({ "table": op.table }),
            ));
        }
    };
    let pk = table.pk_column();
    let key = match coerce(&pk.kind, &Value::String(op.id.0.clone()), cfg.bytea) {
        Ok(Some(k)) => k,
        _ => return Err(invalid(&table, &pk.name, &pk.type_name)),
    };
    let mut cols = Vec::new();
    let mut vals = Vec::new();
    if op.op != OpKind::Delete {
        let mut given: Vec<(usize, &Value)> = Vec::new();
        for (name, v) in op.op_data.iter().flatten() {
            let Some(c) = table.column(name) else {
                return Err(Rejection::new(
                    "SCHEMA_MISMATCH",
                    format!("table {} has no column {}", shown(&op.table), shown(name)),
                    json!({ "table": op.table, "column": name }),
                ));
            };
            if c == table.pk {
                // Some connectors repeat the id in the data; it may not name another row.
                let same = coerce(&pk.kind, v, cfg.bytea).ok().flatten().as_deref() == Some(&key);
                if !same {
                    return Err(Rejection::new(
                        "INVALID_DATA",
                        format!(
                            "{} in the data of table {} differs from the operation's id",
                            shown(name),
                            shown(&op.table)
                        ),
                        json!({ "table": op.table, "column": name }),
                    ));
                }
                continue;
            }
            if !table.columns[c].writable {
                return Err(Rejection::new(
                    "SCHEMA_MISMATCH",
                    format!(
                        "column {} of table {} is generated and cannot be written",
                        shown(name),
                        shown(&op.table)
                    ),
                    json!({ "table": op.table, "column": name }),
                ));
            }
            given.push((c, v));
        }
        given.sort_by_key(|(c, _)| *c);
        for (c, v) in given {
            let col = &table.columns[c];
            let text = coerce(&col.kind, v, cfg.bytea)
                .map_err(|_| invalid(&table, &col.name, &col.type_name))?;
            cols.push(c);
            vals.push(text);
        }
    }
    Ok(RowOp {
        table,
        kind: op.op,
        key,
        cols,
        vals,
    })
}

fn invalid(table: &Table, column: &str, type_name: &str) -> Rejection {
    Rejection::new(
        "INVALID_DATA",
        format!(
            "invalid value for column {}.{}: expected {}",
            shown(&table.name),
            shown(column),
            type_name
        ),
        json!({ "table": table.name, "column": column, "expected_type": type_name }),
    )
}

/// A client-supplied name as it may appear in a message: quoted, escaped, bounded.
fn shown(name: &str) -> String {
    let cut: String = name.chars().take(64).collect();
    let ell = if cut.len() < name.len() { "…" } else { "" };
    format!("{:?}{ell}", cut)
}

/// Which operation of which transaction (positions in the request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpRef {
    pub tx: usize,
    pub op: usize,
}

/// A statement parameter: values travel as text (and text arrays) and are cast in SQL.
#[derive(Debug, Clone)]
pub(crate) enum Param {
    Text(Option<String>),
    Texts(Vec<Option<String>>),
}

impl Param {
    pub fn as_sql(&self) -> &(dyn tokio_postgres::types::ToSql + Sync) {
        match self {
            Param::Text(t) => t,
            Param::Texts(t) => t,
        }
    }
}

/// One SQL statement over one or more rows, with its parameters.
#[derive(Debug)]
pub(crate) struct Stmt {
    pub sql: String,
    pub params: Vec<Param>,
    /// The operations it applies; empty for crudgate's own bookkeeping (ledger, rejections).
    pub ops: Vec<OpRef>,
    /// Rows the statement must touch (PATCH when a missing row is rejected).
    pub expect_rows: Option<u64>,
}

/// A statement per operation, in order (the exact path, and the naive planner). An empty PATCH
/// needs no statement unless missing rows are rejected.
pub(crate) fn one_per_op(tx: usize, ops: &[RowOp], cfg: &EngineConfig) -> Vec<Stmt> {
    ops.iter()
        .enumerate()
        .filter_map(|(i, op)| statement(&[(OpRef { tx, op: i }, op)], cfg))
        .collect()
}

/// Groups the operations of several transactions into bulk statements. Only valid when all of
/// them are to be applied (the caller falls back to `one_per_op` on any failure).
///
/// Operations join one statement when they are of one table, op and column set, and name
/// distinct rows. Without regrouping, only neighbours join. For a table whose rows commute
/// (see `Table::rows_commute`), any run of operations on distinct rows of that table is
/// regrouped by op and column set, which turns a randomly interleaved run into a handful of
/// statements without changing the result.
pub(crate) fn bulk<'a>(
    ops: impl Iterator<Item = (OpRef, &'a RowOp)>,
    cfg: &EngineConfig,
) -> Vec<Stmt> {
    let mut out = Vec::new();
    let mut window: Vec<Vec<(OpRef, &RowOp)>> = Vec::new();
    let mut keys: HashSet<&str> = HashSet::new();
    let flush = |window: &mut Vec<Vec<(OpRef, &'a RowOp)>>, out: &mut Vec<Stmt>| {
        for group in window.drain(..) {
            out.extend(statement(&group, cfg));
        }
    };
    for (at, op) in ops {
        if op.kind == OpKind::Patch
            && op.cols.is_empty()
            && cfg.patch_missing == PatchMissing::Ignore
        {
            continue;
        }
        let same_table = window
            .first()
            .is_some_and(|g| Arc::ptr_eq(&g[0].1.table, &op.table));
        if !same_table || keys.contains(op.key.as_str()) {
            flush(&mut window, &mut out);
            keys.clear();
        }
        keys.insert(op.key.as_str());
        let fits = |g: &Vec<(OpRef, &RowOp)>| g[0].1.kind == op.kind && g[0].1.cols == op.cols;
        let slot = if op.table.rows_commute {
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

/// The statement for a group of same-shaped operations on distinct rows.
fn statement(group: &[(OpRef, &RowOp)], cfg: &EngineConfig) -> Option<Stmt> {
    let first = group.first()?.1;
    let t = &first.table;
    let pk = t.pk_column();
    let n = group.len();
    let mut params: Vec<Param> = Vec::with_capacity(first.cols.len() + 1);
    params.push(Param::Texts(
        group.iter().map(|(_, o)| Some(o.key.clone())).collect(),
    ));
    for c in 0..first.cols.len() {
        params.push(Param::Texts(
            group.iter().map(|(_, o)| o.vals[c].clone()).collect(),
        ));
    }
    let mut sql = String::new();
    let mut expect_rows = None;
    let unnest = |sql: &mut String| {
        sql.push_str(" from unnest(");
        for i in 0..params.len() {
            let _ = write!(sql, "{}${}::text[]", if i > 0 { ", " } else { "" }, i + 1);
        }
        sql.push_str(") as _cg_v(");
        for i in 0..params.len() {
            let _ = write!(sql, "{}v{i}", if i > 0 { ", " } else { "" });
        }
        sql.push(')');
    };
    match first.kind {
        OpKind::Put => {
            let _ = write!(sql, "insert into {} ({}", t.ident, pk.ident);
            for &c in &first.cols {
                let _ = write!(sql, ", {}", t.columns[c].ident);
            }
            let _ = write!(sql, ") select v0::{}", pk.type_sql);
            for (i, &c) in first.cols.iter().enumerate() {
                let _ = write!(sql, ", v{}::{}", i + 1, t.columns[c].type_sql);
            }
            unnest(&mut sql);
            let _ = write!(sql, " on conflict ({}) do ", pk.ident);
            if first.cols.is_empty() {
                sql.push_str("nothing");
            } else {
                sql.push_str("update set ");
                for (i, &c) in first.cols.iter().enumerate() {
                    let col = &t.columns[c].ident;
                    let _ = write!(
                        sql,
                        "{}{col} = excluded.{col}",
                        if i > 0 { ", " } else { "" }
                    );
                }
            }
        }
        OpKind::Patch if first.cols.is_empty() => {
            // Only reached when missing rows are rejected: count the rows that exist.
            let _ = write!(
                sql,
                "select 1 from {} where {} = any($1::text[]::{}[])",
                t.ident, pk.ident, pk.type_sql
            );
            expect_rows = Some(n as u64);
        }
        OpKind::Patch => {
            let _ = write!(sql, "update {} as _cg_t set ", t.ident);
            for (i, &c) in first.cols.iter().enumerate() {
                let col = &t.columns[c];
                let _ = write!(
                    sql,
                    "{}{} = _cg_v.v{}::{}",
                    if i > 0 { ", " } else { "" },
                    col.ident,
                    i + 1,
                    col.type_sql
                );
            }
            unnest(&mut sql);
            let _ = write!(sql, " where _cg_t.{} = _cg_v.v0::{}", pk.ident, pk.type_sql);
            if cfg.patch_missing == PatchMissing::Reject {
                expect_rows = Some(n as u64);
            }
        }
        OpKind::Delete => {
            let _ = write!(
                sql,
                "delete from {} where {} = any($1::text[]::{}[])",
                t.ident, pk.ident, pk.type_sql
            );
        }
    }
    Some(Stmt {
        sql,
        params,
        ops: group.iter().map(|(r, _)| *r).collect(),
        expect_rows,
    })
}
