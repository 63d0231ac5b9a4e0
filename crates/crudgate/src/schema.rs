//! The writable schema, read from `pg_catalog`. Every identifier crudgate puts in SQL comes from
//! here, quoted; a client's table or column name is only ever used as a lookup key.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::GenericClient;

use crate::config::EngineConfig;
use crate::rules::{self, Access, Refusal};

/// How values for a column are checked and normalised before they reach Postgres.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Bool,
    Int {
        bits: u8,
    },
    Numeric,
    Float,
    Text,
    Uuid,
    Json,
    Bytea,
    Timestamptz,
    Enum(Arc<[String]>),
    Array(Box<Kind>),
    /// Anything else goes through the type's own text input (date, time, inet, interval, …).
    Other,
}

#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    /// The column name, quoted for SQL.
    pub ident: String,
    /// The column's type as SQL, without modifiers: values are cast to it from text, and the
    /// assignment to the column then applies length/precision checks with proper errors.
    pub type_sql: String,
    /// The type with its modifiers (`numeric(10,2)`), to find which value overflows.
    pub type_full: String,
    /// The type's name as users know it, for messages (`boolean`, `uuid`, `numeric`, …).
    pub type_name: String,
    pub kind: Kind,
    /// Generated and identity-always columns cannot be written by clients.
    pub writable: bool,
    /// Equal values have equal text: false under a nondeterministic collation, where "abc" and
    /// "ABC" can be one key.
    pub deterministic: bool,
    /// A PUT that leaves this column out takes a value that depends on when its row is
    /// inserted (a sequence, `clock_timestamp()`, any volatile default).
    pub volatile_default: bool,
    /// The length of a `varchar(n)` or `char(n)` (or a domain over one): Postgres cuts
    /// trailing spaces beyond it without an error, so a longer key would name another row.
    pub max_chars: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Table {
    pub schema: String,
    pub name: String,
    /// `"schema"."table"`.
    pub ident: String,
    pub columns: Vec<Column>,
    by_name: HashMap<String, usize>,
    /// Index of the single-column primary key in `columns`.
    pub pk: usize,
    /// Operations on distinct rows of this table give the same result in any order: no user
    /// triggers or rules, no unique or exclusion constraint besides the key, no foreign key that
    /// points back at this table. The planner may regroup such operations.
    pub rows_commute: bool,
    /// `INSERT … ON CONFLICT` works: not so with a deferrable key or INSERT or UPDATE rules,
    /// where a PUT updates the rows that exist and inserts the others.
    pub upserts: bool,
    /// The table has INSERT rules. A PUT is refused there: its insert must not depend on the
    /// table's rows (a rule's copy of the insert would see the new row), and `ON CONFLICT`
    /// is not allowed.
    pub insert_rules: bool,
}

impl Table {
    pub fn column(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }
    pub fn pk_column(&self) -> &Column {
        &self.columns[self.pk]
    }

    /// A table of text columns, the first being the key (for unit tests of the planner).
    #[cfg(test)]
    pub(crate) fn of_text_columns(name: &str, columns: &[&str]) -> Table {
        let columns: Vec<Column> = columns
            .iter()
            .map(|c| Column {
                name: (*c).to_owned(),
                ident: quote_ident(c),
                type_sql: "text".into(),
                type_full: "text".into(),
                type_name: "text".into(),
                kind: Kind::Text,
                writable: true,
                deterministic: true,
                volatile_default: false,
                max_chars: None,
            })
            .collect();
        Table {
            schema: "public".into(),
            ident: format!("\"public\".{}", quote_ident(name)),
            name: name.into(),
            by_name: columns
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name.clone(), i))
                .collect(),
            columns,
            pk: 0,
            rows_commute: true,
            upserts: true,
            insert_rules: false,
        }
    }
}

/// Why a table exists in Postgres but cannot take client writes.
#[derive(Debug, Clone)]
pub enum Unwritable {
    NoSingleColumnKey,
}

/// A server table by schema and name.
pub(crate) type TableKey = (String, String);

/// The writable tables, and what clients may do to them (see `rules`).
#[derive(Debug, Default)]
pub struct Catalog {
    tables: HashMap<TableKey, Arc<Table>>,
    unwritable: HashMap<TableKey, Unwritable>,
    /// Client table name → its access, resolved when the catalog loads.
    clients: HashMap<String, Result<Arc<Access>, Refusal>>,
    allow_unlisted: bool,
    /// Some constraint (a foreign key, unique, exclusion or constraint trigger) is checked at
    /// COMMIT rather than after each statement.
    deferred_checks: bool,
}

impl Catalog {
    /// Whether some check runs at COMMIT (see `deferred_checks`): in a group commit it would
    /// judge the members together (one could satisfy another's foreign key) and see the last
    /// member's identity settings.
    pub(crate) fn has_deferred_checks(&self) -> bool {
        self.deferred_checks
    }

    /// What a client may do to the table it calls `name`.
    pub(crate) fn access(&self, name: &str) -> Result<&Arc<Access>, Refusal> {
        match self.clients.get(name) {
            Some(Ok(a)) => Ok(a),
            Some(Err(r)) => Err(r.clone()),
            None if self.allow_unlisted => Err(Refusal::Missing),
            None => Err(Refusal::Unlisted),
        }
    }

    pub fn tables(&self) -> impl Iterator<Item = &Arc<Table>> {
        self.tables.values()
    }

    pub(crate) fn unwritable_keys(&self) -> impl Iterator<Item = &TableKey> {
        self.unwritable.keys()
    }

    /// A loaded table by schema and name.
    pub(crate) fn get(&self, schema: &str, name: &str) -> Result<&Arc<Table>, Option<&Unwritable>> {
        let key = (schema.to_owned(), name.to_owned());
        self.tables
            .get(&key)
            .ok_or_else(|| self.unwritable.get(&key))
    }

    /// The schema of the first of `schemas` holding a table called `name`, writable or not.
    pub(crate) fn find<'s>(&self, schemas: &'s [String], name: &str) -> Option<&'s str> {
        schemas.iter().map(String::as_str).find(|s| {
            let key = (s.to_string(), name.to_owned());
            self.tables.contains_key(&key) || self.unwritable.contains_key(&key)
        })
    }

    /// Reads the tables of the exposed schemas (`schemas`, and those named by table rules),
    /// then resolves the rules against them.
    pub async fn load(
        client: &impl GenericClient,
        cfg: &EngineConfig,
    ) -> Result<Catalog, tokio_postgres::Error> {
        let mut schemas = cfg.schemas.clone();
        for rule in cfg.tables.values() {
            if let Some(s) = &rule.schema {
                if !schemas.contains(s) {
                    schemas.push(s.clone());
                }
            }
        }
        let schemas = &schemas;
        // crudgate's own tables are never client-writable, wherever they are configured to live.
        let own = [
            (
                cfg.rejections_schema.as_str(),
                cfg.rejections_table.as_str(),
            ),
            (cfg.ledger_schema.as_str(), "ledger"),
            (cfg.ledger_schema.as_str(), "migrations"),
        ];
        let enum_rows = client
            .query(
                "select enumtypid, array_agg(enumlabel::text order by enumsortorder)
                   from pg_enum group by enumtypid",
                &[],
            )
            .await?;
        let enums: HashMap<u32, Arc<[String]>> = enum_rows
            .iter()
            .map(|r| (r.get::<_, u32>(0), r.get::<_, Vec<String>>(1).into()))
            .collect();

        let deferred_checks: bool = client
            .query_one(
                "select exists (select 1 from pg_constraint where condeferred)",
                &[],
            )
            .await?
            .get(0);
        let rows = client.query(CATALOG_SQL, &[&schemas]).await?;
        let mut per_table: Vec<(TableKey, TableRow, Vec<Column>)> = Vec::new();
        for r in &rows {
            let schema: String = r.get("nspname");
            let table: String = r.get("relname");
            let key = (schema.clone(), table.clone());
            if per_table.last().map(|t| &t.0) != Some(&key) {
                per_table.push((
                    key,
                    TableRow {
                        pk: r.get("pk"),
                        rows_commute: r.get("rows_commute"),
                        upserts: r.get("upserts"),
                        insert_rules: r.get("insert_rules"),
                    },
                    Vec::new(),
                ));
            }
            let base_oid: u32 = r.get("base_oid");
            let elem_oid: u32 = r.get("elem_oid");
            let base_is_enum: bool = r.get("base_is_enum");
            let elem_is_enum: bool = r.get("elem_is_enum");
            let base_name: String = r.get("base_name");
            let kind = if elem_oid != 0 {
                Kind::Array(Box::new(kind_of(
                    elem_oid,
                    elem_is_enum,
                    &r.get::<_, String>("elem_name"),
                    &enums,
                )))
            } else {
                kind_of(base_oid, base_is_enum, &base_name, &enums)
            };
            let name: String = r.get("attname");
            per_table.last_mut().expect("pushed above").2.push(Column {
                ident: quote_ident(&name),
                name,
                type_sql: r.get("type_sql"),
                type_full: r.get("type_full"),
                type_name: r.get("type_name"),
                kind,
                writable: r.get("writable"),
                deterministic: r.get("deterministic"),
                volatile_default: r.get("volatile_default"),
                max_chars: r
                    .get::<_, Option<i32>>("max_chars")
                    .and_then(|n| usize::try_from(n).ok()),
            });
        }

        let mut catalog = Catalog {
            allow_unlisted: cfg.allow_unlisted_tables,
            deferred_checks,
            ..Catalog::default()
        };
        for ((schema, name), meta, columns) in per_table {
            if own.contains(&(schema.as_str(), name.as_str())) {
                continue;
            }
            let key = (schema.clone(), name.clone());
            let pk = match meta.pk.as_deref() {
                Some([attname]) => columns.iter().position(|c| &c.name == attname),
                _ => None,
            };
            let Some(pk) = pk else {
                catalog
                    .unwritable
                    .insert(key, Unwritable::NoSingleColumnKey);
                continue;
            };
            let by_name = columns
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name.clone(), i))
                .collect();
            let table = Table {
                ident: format!("{}.{}", quote_ident(&schema), quote_ident(&name)),
                schema,
                name,
                columns,
                by_name,
                pk,
                rows_commute: meta.rows_commute,
                upserts: meta.upserts,
                insert_rules: meta.insert_rules,
            };
            catalog.tables.insert(key, Arc::new(table));
        }
        catalog.clients = rules::resolve_all(&catalog, cfg);
        Ok(catalog)
    }
}

struct TableRow {
    pk: Option<Vec<String>>,
    rows_commute: bool,
    upserts: bool,
    insert_rules: bool,
}

fn kind_of(oid: u32, is_enum: bool, name: &str, enums: &HashMap<u32, Arc<[String]>>) -> Kind {
    if is_enum {
        if let Some(labels) = enums.get(&oid) {
            return Kind::Enum(labels.clone());
        }
    }
    match oid {
        16 => Kind::Bool,
        21 => Kind::Int { bits: 16 },
        23 => Kind::Int { bits: 32 },
        20 => Kind::Int { bits: 64 },
        1700 => Kind::Numeric,
        700 | 701 => Kind::Float,
        25 | 1043 | 1042 | 19 => Kind::Text,
        2950 => Kind::Uuid,
        114 | 3802 => Kind::Json,
        17 => Kind::Bytea,
        1184 => Kind::Timestamptz,
        _ if name == "citext" => Kind::Text,
        _ => Kind::Other,
    }
}

/// Quotes an identifier for SQL: always, so that no name is ever read as a keyword or syntax.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Columns of ordinary and partitioned tables in the exposed schemas, with what the planner
/// needs to know about each table. Domains are resolved to their base type for value checks;
/// values are still cast to the domain so its constraints apply.
const CATALOG_SQL: &str = r#"
with recursive dom(oid, base, modified, chain, typmod) as (
    select t.oid, t.oid, false, array[]::oid[], -1 from pg_type t where t.typtype <> 'd'
    union all
    select d.oid, b.base, b.modified or d.typtypmod >= 0, b.chain || d.oid,
           greatest(b.typmod, d.typtypmod)
      from pg_type d join dom b on d.typbasetype = b.oid where d.typtype = 'd'
)
select n.nspname::text as nspname,
       c.relname::text as relname,
       a.attname::text as attname,
       -- Without a modifier, `character` and `bit` mean length 1, and an explicit cast to them
       -- truncates ('abc'::character is 'a'): cast to their unbounded forms, so that the
       -- assignment checks the length. An explicit cast to a domain over a modified type
       -- (`varchar(3)`) truncates too: cast to the unbounded base type instead, and the
       -- assignment to the column applies the domain, its length check included.
       case when dom.modified then
                case bt.oid when 'bpchar'::regtype then 'bpchar'
                            when '_bpchar'::regtype then 'bpchar[]'
                            when 'bit'::regtype then 'varbit'
                            when '_bit'::regtype then 'varbit[]'
                            else format_type(bt.oid, null) end
            else case a.atttypid
                      when 'bpchar'::regtype then 'bpchar'
                      when '_bpchar'::regtype then 'bpchar[]'
                      when 'bit'::regtype then 'varbit'
                      when '_bit'::regtype then 'varbit[]'
                      else format_type(a.atttypid, null) end
       end as type_sql,
       format_type(a.atttypid, null) as type_name,
       case when bt.oid in ('varchar'::regtype, 'bpchar'::regtype)
                 and greatest(a.atttypmod, dom.typmod) >= 4
            then greatest(a.atttypmod, dom.typmod) - 4 end as max_chars,
       format_type(a.atttypid, a.atttypmod) as type_full,
       bt.oid as base_oid,
       bt.typname::text as base_name,
       bt.typtype = 'e' as base_is_enum,
       coalesce(et.oid, 0::oid) as elem_oid,
       coalesce(et.typname::text, '') as elem_name,
       coalesce(et.typtype = 'e', false) as elem_is_enum,
       a.attgenerated = '' and a.attidentity <> 'a' as writable,
       coalesce((select co.collisdeterministic from pg_collation co where co.oid = a.attcollation),
                true) as deterministic,
       -- Identity columns, and defaults calling a volatile function (`nextval` of a serial
       -- included) directly or through an operator, found in the stored expression tree of
       -- the column's default or, without one, of its domains'.
       a.attgenerated = '' and (a.attidentity <> '' or exists (
           select 1
             from (select ad.adbin::text as tree from pg_attrdef ad
                    where ad.adrelid = c.oid and ad.adnum = a.attnum
                   union all
                   select d.typdefaultbin::text from pg_type d
                    where d.oid = any(dom.chain) and d.typdefaultbin is not null) as defaults
            cross join lateral regexp_matches(defaults.tree, ':(funcid|opno) (\d+)', 'g') as f
             left join pg_operator o on f[1] = 'opno' and o.oid = f[2]::oid
             join pg_proc p on p.oid = case f[1] when 'opno' then o.oprcode::oid
                                                 else f[2]::oid end
            where p.provolatile = 'v')) as volatile_default,
       (select array_agg(ka.attname::text)
          from pg_constraint k
          join pg_attribute ka on ka.attrelid = k.conrelid and ka.attnum = any(k.conkey)
         where k.conrelid = c.oid and k.contype = 'p') as pk,
       not exists (select 1 from pg_trigger tg where tg.tgrelid = c.oid and not tg.tgisinternal)
       and not exists (select 1 from pg_rewrite rw where rw.ev_class = c.oid and rw.rulename <> '_RETURN')
       and not exists (select 1 from pg_index ix where ix.indrelid = c.oid and ix.indisunique and not ix.indisprimary)
       and not exists (select 1 from pg_constraint k where k.conrelid = c.oid
                          and (k.contype = 'x' or (k.contype = 'f' and k.confrelid = c.oid)))
       and not exists (select 1 from pg_constraint k where k.confrelid = c.oid and k.contype = 'f'
                          and (k.confdeltype not in ('a', 'r') or k.confupdtype not in ('a', 'r')))
       as rows_commute,
       not exists (select 1 from pg_constraint k
                    where k.conrelid = c.oid and k.contype = 'p' and k.condeferrable)
       and not exists (select 1 from pg_rewrite rw where rw.ev_class = c.oid and rw.ev_type in ('2', '3'))
       as upserts,
       exists (select 1 from pg_rewrite rw where rw.ev_class = c.oid and rw.ev_type = '3')
       as insert_rules
  from pg_class c
  join pg_namespace n on n.oid = c.relnamespace
  join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
  join dom on dom.oid = a.atttypid
  join pg_type bt on bt.oid = dom.base
  left join pg_type et on bt.typcategory = 'A' and et.oid = bt.typelem and bt.typelem <> 0
 where c.relkind in ('r', 'p')
   and n.nspname = any($1)
 order by array_position($1, n.nspname::text), c.relname, a.attnum
"#;
