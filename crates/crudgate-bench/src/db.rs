//! Direct database work: fresh databases, seeding, verification, and the raw SQL limit (the
//! best bulk SQL sent with tokio-postgres, no HTTP and no crudgate).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use futures::future::{try_join_all, BoxFuture};
use futures::FutureExt;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};
use uuid::Uuid;

use crate::gen::{micros, Field, Load, Op, Todo};
use crate::stats::Sample;

pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    // Errors surface on the client's calls; the end of a connection (also when a database is
    // dropped with `force` after a measurement) is not one.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Creates database `name` with the demo schema and the load's lists and pre-seeded rows, then
/// checkpoints so that the measurement does not pay for the seeding's dirty pages.
pub async fn prepare(admin: &Client, url: &str, name: &str, load: &Load) -> anyhow::Result<()> {
    admin
        .batch_execute(&format!("create database {name}"))
        .await?;
    let c = connect(url).await?;
    c.batch_execute(crudgate::DEMO_SCHEMA).await?;
    let lists: Vec<&(Uuid, String)> = load.clients.iter().flat_map(|c| &c.lists).collect();
    let ids: Vec<Uuid> = lists.iter().map(|l| l.0).collect();
    let names: Vec<&str> = lists.iter().map(|l| l.1.as_str()).collect();
    let owners: Vec<Option<&str>> = vec![None; lists.len()];
    c.execute(
        "insert into lists (id, name, owner_id) select * from unnest($1::uuid[], $2::text[], $3::text[])",
        &[&ids, &names, &owners],
    )
    .await?;
    let seed: Vec<&Todo> = load.clients.iter().flat_map(|c| &c.seed).collect();
    for part in seed.chunks(10_000) {
        let a = TodoArrays::new(part.iter().copied());
        c.execute(UPSERT, &a.params()).await?;
    }
    c.batch_execute("vacuum analyze").await?;
    admin.batch_execute("checkpoint").await?;
    Ok(())
}

pub async fn drop_database(admin: &Client, name: &str) -> anyhow::Result<()> {
    admin
        .batch_execute(&format!("drop database if exists {name} with (force)"))
        .await?;
    Ok(())
}

/// FNV-1a over the canonical text of every row, in id order.
pub fn checksum(rows: &BTreeMap<Uuid, Todo>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for t in rows.values() {
        let line = format!(
            "{}|{}|{:?}|{:?}|{}|{:?}|{:?}|{}\n",
            t.id,
            t.created_at,
            t.completed_at,
            t.description,
            t.completed,
            t.created_by,
            t.completed_by,
            t.list_id
        );
        for b in line.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Reads `todos` and compares row count and checksum with the expected state; returns the
/// checksum. A difference is an error naming the first differing row.
pub async fn verify(url: &str, expected: &BTreeMap<Uuid, Todo>) -> anyhow::Result<u64> {
    let c = connect(url).await?;
    let rows = c
        .query(
            "select id, created_at, completed_at, description, completed, created_by, completed_by, list_id from todos",
            &[],
        )
        .await?;
    let mut actual = BTreeMap::new();
    for r in rows {
        let created_at: DateTime<Utc> = r.get(1);
        let completed_at: Option<DateTime<Utc>> = r.get(2);
        let t = Todo {
            id: r.get(0),
            created_at: created_at.timestamp_micros(),
            completed_at: completed_at.map(|t| t.timestamp_micros()),
            description: r.get(3),
            completed: r.get(4),
            created_by: r.get(5),
            completed_by: r.get(6),
            list_id: r.get(7),
        };
        actual.insert(t.id, t);
    }
    let (want, got) = (checksum(expected), checksum(&actual));
    if actual.len() != expected.len() || want != got {
        let diff = expected
            .iter()
            .find(|(id, t)| actual.get(id) != Some(t))
            .map(|(id, t)| format!("row {id}: expected {t:?}, found {:?}", actual.get(id)))
            .or_else(|| {
                actual
                    .keys()
                    .find(|id| !expected.contains_key(id))
                    .map(|id| format!("unexpected row {id}"))
            })
            .unwrap_or_default();
        bail!(
            "wrong final state: {} rows (checksum {got:016x}), expected {} rows (checksum {want:016x}); {diff}",
            actual.len(),
            expected.len()
        );
    }
    Ok(got)
}

/// An upsert of every `todos` column from `$source` (eight values or arrays, in column order).
macro_rules! upsert {
    ($source:literal) => {
        concat!(
            "insert into todos (id, created_at, completed_at, description, completed, created_by, completed_by, list_id) ",
            $source,
            " on conflict (id) do update set created_at = excluded.created_at, \
             completed_at = excluded.completed_at, description = excluded.description, \
             completed = excluded.completed, created_by = excluded.created_by, \
             completed_by = excluded.completed_by, list_id = excluded.list_id"
        )
    };
}
const UPSERT: &str = upsert!(
    "select * from unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::text[], $5::bool[], $6::text[], $7::text[], $8::uuid[])"
);
const UPSERT_ONE: &str = upsert!("values ($1, $2, $3, $4, $5, $6, $7, $8)");

/// Typed column arrays of some rows, sent as binary array parameters.
struct TodoArrays {
    id: Vec<Uuid>,
    created_at: Vec<DateTime<Utc>>,
    completed_at: Vec<Option<DateTime<Utc>>>,
    description: Vec<String>,
    completed: Vec<bool>,
    created_by: Vec<Option<String>>,
    completed_by: Vec<Option<String>>,
    list_id: Vec<Uuid>,
}

impl TodoArrays {
    fn new<'a>(rows: impl Iterator<Item = &'a Todo>) -> Self {
        let mut a = TodoArrays {
            id: Vec::new(),
            created_at: Vec::new(),
            completed_at: Vec::new(),
            description: Vec::new(),
            completed: Vec::new(),
            created_by: Vec::new(),
            completed_by: Vec::new(),
            list_id: Vec::new(),
        };
        for t in rows {
            a.id.push(t.id);
            a.created_at.push(micros(t.created_at));
            a.completed_at.push(t.completed_at.map(micros));
            a.description.push(t.description.clone());
            a.completed.push(t.completed);
            a.created_by.push(t.created_by.clone());
            a.completed_by.push(t.completed_by.clone());
            a.list_id.push(t.list_id);
        }
        a
    }
    fn params(&self) -> [&(dyn ToSql + Sync); 8] {
        [
            &self.id,
            &self.created_at,
            &self.completed_at,
            &self.description,
            &self.completed,
            &self.created_by,
            &self.completed_by,
            &self.list_id,
        ]
    }
}

/// Every PATCH of a transaction as one statement: per column, a mask saying whether the op
/// sets it and the value. One masked statement measured about 40 % faster on W1 than one
/// `update … from unnest` per column set (four statements per request).
#[derive(Default)]
struct Patches {
    id: Vec<Uuid>,
    set_completed_at: Vec<bool>,
    completed_at: Vec<Option<DateTime<Utc>>>,
    set_description: Vec<bool>,
    description: Vec<Option<String>>,
    set_completed: Vec<bool>,
    completed: Vec<bool>,
    set_completed_by: Vec<bool>,
    completed_by: Vec<Option<String>>,
}

const PATCH: &str = "update todos as t set \
     completed_at = case when v.m0 then v.c0 else t.completed_at end, \
     description = case when v.m1 then v.c1 else t.description end, \
     completed = case when v.m2 then v.c2 else t.completed end, \
     completed_by = case when v.m3 then v.c3 else t.completed_by end \
     from unnest($1::uuid[], $2::bool[], $3::timestamptz[], $4::bool[], $5::text[], $6::bool[], $7::bool[], $8::bool[], $9::text[]) \
     as v(id, m0, c0, m1, c1, m2, c2, m3, c3) where t.id = v.id";

impl Patches {
    fn push(&mut self, id: Uuid, fields: &[Field]) {
        self.id.push(id);
        self.set_completed_at.push(false);
        self.completed_at.push(None);
        self.set_description.push(false);
        self.description.push(None);
        self.set_completed.push(false);
        self.completed.push(false);
        self.set_completed_by.push(false);
        self.completed_by.push(None);
        let i = self.id.len() - 1;
        for f in fields {
            match f {
                Field::CompletedAt(t) => {
                    self.set_completed_at[i] = true;
                    self.completed_at[i] = t.map(micros);
                }
                Field::Description(d) => {
                    self.set_description[i] = true;
                    self.description[i] = Some(d.clone());
                }
                Field::Completed(b) => {
                    self.set_completed[i] = true;
                    self.completed[i] = *b;
                }
                Field::CompletedBy(b) => {
                    self.set_completed_by[i] = true;
                    self.completed_by[i] = b.clone();
                }
            }
        }
    }
    fn params(&self) -> [&(dyn ToSql + Sync); 9] {
        [
            &self.id,
            &self.set_completed_at,
            &self.completed_at,
            &self.set_description,
            &self.description,
            &self.set_completed,
            &self.completed,
            &self.set_completed_by,
            &self.completed_by,
        ]
    }
}

/// A connection applying transactions of ops with the fastest SQL we know.
pub struct Raw {
    client: Client,
    stmts: HashMap<String, Statement>,
}

impl Raw {
    pub async fn connect(url: &str) -> anyhow::Result<Raw> {
        Ok(Raw {
            client: connect(url).await?,
            stmts: HashMap::new(),
        })
    }

    async fn stmt(&mut self, sql: &str) -> anyhow::Result<Statement> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        self.stmts.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    /// One database transaction, pipelined in a single round trip: BEGIN, one upsert of all
    /// PUTs, one masked update of all PATCHes, one delete, COMMIT. The
    /// generator guarantees these commute (PATCH and DELETE touch distinct pre-existing rows,
    /// no row is patched twice in a transaction). A lone PUT uses a plain single-row upsert.
    pub async fn apply(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        if let [Op::Put(t)] = ops {
            let st = self.stmt(UPSERT_ONE).await?;
            let (created_at, completed_at) = (micros(t.created_at), t.completed_at.map(micros));
            let params: [&(dyn ToSql + Sync); 8] = [
                &t.id,
                &created_at,
                &completed_at,
                &t.description,
                &t.completed,
                &t.created_by,
                &t.completed_by,
                &t.list_id,
            ];
            let c = &self.client;
            let (b, i, e) = tokio::join!(
                c.batch_execute("begin"),
                c.execute(&st, &params),
                c.batch_execute("commit")
            );
            b?;
            i?;
            e?;
            return Ok(());
        }
        let puts = TodoArrays::new(ops.iter().filter_map(|o| match o {
            Op::Put(t) => Some(t),
            _ => None,
        }));
        let mut patches = Patches::default();
        let mut deletes: Vec<Uuid> = Vec::new();
        for o in ops {
            match o {
                Op::Put(_) => {}
                Op::Patch(id, fields) => patches.push(*id, fields),
                Op::Delete(id) => deletes.push(*id),
            }
        }
        let upsert = self.stmt(UPSERT).await?;
        let patch = self.stmt(PATCH).await?;
        let delete = self
            .stmt("delete from todos where id = any($1::uuid[])")
            .await?;
        let (put_params, patch_params) = (puts.params(), patches.params());
        let delete_params: [&(dyn ToSql + Sync); 1] = [&deletes];
        let c = &self.client;
        let mut pipeline: Vec<BoxFuture<'_, Result<u64, tokio_postgres::Error>>> = Vec::new();
        pipeline.push(c.batch_execute("begin").map(|r| r.map(|_| 0)).boxed());
        if !puts.id.is_empty() {
            pipeline.push(c.execute(&upsert, &put_params).boxed());
        }
        if !patches.id.is_empty() {
            pipeline.push(c.execute(&patch, &patch_params).boxed());
        }
        if !deletes.is_empty() {
            pipeline.push(c.execute(&delete, &delete_params).boxed());
        }
        pipeline.push(c.batch_execute("commit").map(|r| r.map(|_| 0)).boxed());
        try_join_all(pipeline).await?;
        Ok(())
    }
}

/// The raw limit: one connection per client, each sending its ops as transactions of
/// `ops_per_tx`. Latency is per transaction.
pub async fn run_raw(url: &str, load: &Load, ops_per_tx: usize) -> anyhow::Result<Sample> {
    let mut conns = Vec::new();
    for _ in &load.clients {
        conns.push(Raw::connect(url).await?);
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(conns.len() + 1));
    let tasks: Vec<_> = conns
        .into_iter()
        .zip(&load.clients)
        .map(|(mut raw, client)| {
            let ops = client.ops.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let mut lat = Vec::new();
                for tx in ops.chunks(ops_per_tx) {
                    let t0 = Instant::now();
                    raw.apply(tx).await?;
                    lat.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                anyhow::Ok(lat)
            })
        })
        .collect();
    barrier.wait().await;
    let start = Instant::now();
    let mut lats = Vec::new();
    for t in tasks {
        lats.push(t.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Sample::new(load.total_ops(), secs, lats.concat()))
}
