//! Authorization: which client tables map to which server tables, and what a caller may write
//! there. Rules come from `[engine.tables.<client table>]` (see `config::TableRule`) and are
//! resolved against the catalog each time it loads, so that every check in `plan` is a lookup
//! and no rule needs SQL of its own beyond the ownership guard.
//!
//! A rule that does not fit the database (unknown column, missing table) is logged as an error
//! at every load and its table refused with `SCHEMA_MISMATCH` until the schema or the
//! configuration is fixed: the server cannot know the start order of migrations and servers,
//! so a start-time failure would be both too early and too late. Static mistakes (both
//! `columns` and `deny_columns`, a bad `set` value) fail the start instead
//! (`EngineConfig::validate`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::config::{EngineConfig, SetValue, TableRule};
use crate::protocol::OpKind;
use crate::schema::{Catalog, Table, Unwritable};

/// Why a client table cannot be written.
#[derive(Debug, Clone)]
pub(crate) enum Refusal {
    /// No rule names it and unlisted tables are not allowed: `UNAUTHORIZED`.
    Unlisted,
    /// No such table in the exposed schemas (it may be created later): `SCHEMA_MISMATCH`.
    Missing,
    /// The table has no single-column primary key: `SCHEMA_MISMATCH`.
    NoSingleColumnKey,
    /// The rule does not fit the table; the reason is in the server log: `SCHEMA_MISMATCH`.
    BadRule,
}

/// What clients may do to one table, resolved against the catalog.
#[derive(Debug)]
pub(crate) struct Access {
    pub table: Arc<Table>,
    ops: Vec<OpKind>,
    /// Client column name → server column position, for every column the client can name.
    by_client_name: HashMap<String, usize>,
    /// Per server column: the client's name for it (for messages).
    client_names: Vec<String>,
    /// Per server column: the client may write it.
    writable: Vec<bool>,
    /// Server-set columns, by position, ascending.
    pub set: Vec<(usize, SetValue)>,
    /// The owner column's position.
    pub owner: Option<usize>,
}

impl Access {
    pub fn allows(&self, op: OpKind) -> bool {
        self.ops.contains(&op)
    }

    /// The server column a client column name stands for.
    pub fn column(&self, client_name: &str) -> Option<usize> {
        self.by_client_name.get(client_name).copied()
    }

    pub fn may_write(&self, c: usize) -> bool {
        self.writable[c]
    }

    pub fn client_name(&self, c: usize) -> &str {
        &self.client_names[c]
    }

    pub fn server_set(&self, c: usize) -> Option<&SetValue> {
        self.set.iter().find(|(s, _)| *s == c).map(|(_, v)| v)
    }

    /// No rule: every op, every column, names as in the database.
    fn unrestricted(table: Arc<Table>) -> Access {
        let names: Vec<String> = table.columns.iter().map(|c| c.name.clone()).collect();
        Access {
            by_client_name: names.iter().cloned().zip(0..).collect(),
            writable: vec![true; names.len()],
            client_names: names,
            ops: vec![OpKind::Put, OpKind::Patch, OpKind::Delete],
            set: Vec::new(),
            owner: None,
            table,
        }
    }
}

/// Resolves every rule, and (when allowed) every unlisted table, against the catalog.
pub(crate) fn resolve_all(
    catalog: &Catalog,
    cfg: &EngineConfig,
) -> HashMap<String, Result<Arc<Access>, Refusal>> {
    let mut out = HashMap::new();
    // A server table a rule writes to is reachable only through its rule(s): otherwise its
    // plain name would be a way around the rule (ownership, column lists).
    let mut ruled: HashSet<(String, String)> = HashSet::new();
    for (client, rule) in &cfg.tables {
        let name = rule.table.as_deref().unwrap_or(client);
        let schema = match &rule.schema {
            Some(s) => Some(s.as_str()),
            None => catalog.find(&cfg.schemas, name),
        };
        let resolved = match schema {
            None => {
                tracing::error!(table = %client, "table rule names a table that does not exist");
                Err(Refusal::Missing)
            }
            Some(schema) => {
                ruled.insert((schema.to_owned(), name.to_owned()));
                match catalog.get(schema, name) {
                    Ok(t) => resolve(client, rule, t.clone()).map(Arc::new).map_err(|why| {
                        tracing::error!(table = %client, problem = %why, "table rule does not fit the database; writes to it are refused");
                        Refusal::BadRule
                    }),
                    Err(Some(Unwritable::NoSingleColumnKey)) => Err(Refusal::NoSingleColumnKey),
                    Err(None) => {
                        tracing::error!(table = %client, "table rule names a table that does not exist");
                        Err(Refusal::Missing)
                    }
                }
            }
        };
        out.insert(client.clone(), resolved);
    }
    if cfg.allow_unlisted_tables {
        for schema in &cfg.schemas {
            for t in catalog.tables().filter(|t| &t.schema == schema) {
                if ruled.contains(&(t.schema.clone(), t.name.clone())) {
                    continue;
                }
                out.entry(t.name.clone())
                    .or_insert_with(|| Ok(Arc::new(Access::unrestricted(t.clone()))));
            }
            // Earlier schemas win: an unwritable table hides a writable one of a later schema.
            for (_, name) in catalog.unwritable_keys().filter(|(s, _)| s == schema) {
                out.entry(name.clone())
                    .or_insert(Err(Refusal::NoSingleColumnKey));
            }
        }
    }
    out
}

/// One rule against its table; the error says what does not fit (for the log).
pub(crate) fn resolve(client: &str, rule: &TableRule, table: Arc<Table>) -> Result<Access, String> {
    let mut access = Access::unrestricted(table.clone());
    access.ops = rule.ops.clone();
    let server = |name: &str| {
        table
            .column(name)
            .ok_or_else(|| format!("table {} has no column {name:?}", table.ident))
    };
    // Renamed columns answer to their client name only.
    for (from, to) in &rule.rename {
        let c = server(to)?;
        access.by_client_name.remove(to);
        access.client_names[c] = from.clone();
    }
    for (from, to) in &rule.rename {
        let c = server(to)?;
        if access.by_client_name.insert(from.clone(), c).is_some() {
            return Err(format!(
                "client column {from:?} of {client:?} names two server columns"
            ));
        }
    }
    let client_col = |name: &str, access: &Access| {
        access
            .column(name)
            .ok_or_else(|| format!("client table {client:?} has no column {name:?}"))
    };
    if let Some(allowed) = &rule.columns {
        let mut writable = vec![false; table.columns.len()];
        for name in allowed {
            writable[client_col(name, &access)?] = true;
        }
        access.writable = writable;
    }
    for name in &rule.deny_columns {
        let c = client_col(name, &access)?;
        access.writable[c] = false;
    }
    for (name, value) in &rule.set {
        let c = server(name)?;
        if c == table.pk || !table.columns[c].writable {
            return Err(format!("column {name:?} cannot be set by the server"));
        }
        access.set.push((c, value.clone()));
    }
    if let Some(owner) = &rule.owner {
        let c = server(owner)?;
        if c == table.pk || !table.columns[c].writable {
            return Err(format!("column {owner:?} cannot be an owner column"));
        }
        access.owner = Some(c);
        // The owner column always holds the caller's sub on PUT.
        if access.server_set(c).is_none() {
            access.set.push((c, SetValue::Claim(vec!["sub".into()])));
        }
    }
    access.set.sort_by_key(|(c, _)| *c);
    // The key is never subject to column lists: it is the operation's id.
    access.writable[table.pk] = true;
    Ok(access)
}
