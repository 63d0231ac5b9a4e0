//! Workload generation: the operations each simulated client sends, encoded in the reference
//! wire contract, and the table state they must leave behind.
//!
//! Everything is derived from a seed, so every run of a workload sends the same bytes. Each
//! client owns its lists and rows; PATCH and DELETE only touch pre-seeded rows, the rows a
//! client deletes are never patched, each is deleted once, and no row is patched twice in one
//! 100-op chunk (the unit of one W1 request), so the final state is exactly the in-order
//! application of the ops.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use uuid::Uuid;

/// A `todos` row, as the demo schema defines it. Timestamps in microseconds since the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Todo {
    pub id: Uuid,
    pub created_at: i64,
    pub completed_at: Option<i64>,
    pub description: String,
    pub completed: bool,
    pub created_by: Option<String>,
    pub completed_by: Option<String>,
    pub list_id: Uuid,
}

/// One column value of a PATCH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Description(String),
    Completed(bool),
    CompletedAt(Option<i64>),
    CompletedBy(Option<String>),
}

impl Field {
    pub fn column(&self) -> &'static str {
        match self {
            Field::Description(_) => "description",
            Field::Completed(_) => "completed",
            Field::CompletedAt(_) => "completed_at",
            Field::CompletedBy(_) => "completed_by",
        }
    }
    fn json(&self) -> Value {
        match self {
            Field::Description(s) => json!(s),
            Field::Completed(b) => json!(if *b { 1 } else { 0 }),
            Field::CompletedAt(t) => t.map(ts).map_or(Value::Null, Value::String),
            Field::CompletedBy(s) => json!(s),
        }
    }
    fn apply(&self, row: &mut Todo) {
        match self {
            Field::Description(s) => row.description = s.clone(),
            Field::Completed(b) => row.completed = *b,
            Field::CompletedAt(t) => row.completed_at = *t,
            Field::CompletedBy(s) => row.completed_by = s.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Op {
    Put(Todo),
    /// Columns in a fixed order per column set.
    Patch(Uuid, Vec<Field>),
    Delete(Uuid),
}

impl Op {
    pub fn id(&self) -> Uuid {
        match self {
            Op::Put(t) => t.id,
            Op::Patch(id, _) | Op::Delete(id) => *id,
        }
    }
}

/// What one simulated client owns and sends.
#[derive(Debug, Clone)]
pub struct ClientLoad {
    pub lists: Vec<(Uuid, String)>,
    /// Rows that exist before the workload starts.
    pub seed: Vec<Todo>,
    /// The client's operations, in queue order.
    pub ops: Vec<Op>,
}

/// A workload's data for all clients.
#[derive(Debug, Clone)]
pub struct Load {
    pub clients: Vec<ClientLoad>,
}

/// RFC 3339 with microseconds, as a PowerSync client would send it.
pub fn ts(us: i64) -> String {
    micros(us).format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

pub fn micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).expect("timestamp in range")
}

const BASE_TS: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z
const WORDS: [&str; 12] = [
    "buy", "milk", "call", "dentist", "fix", "bike", "write", "report", "water", "plants", "book",
    "flights",
];

struct Gen {
    rng: StdRng,
    client: usize,
    seq: u64,
}

impl Gen {
    fn new(seed: u64, salt: u64, client: usize) -> Self {
        Gen {
            rng: StdRng::seed_from_u64(
                seed ^ (salt << 32) ^ (client as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ),
            client,
            seq: 0,
        }
    }
    fn uuid(&mut self) -> Uuid {
        Uuid::from_u128(self.rng.gen::<u128>() & !(0xf000 << 64) | (0x4000 << 64))
    }
    fn text(&mut self) -> String {
        let n = self.rng.gen_range(3..7);
        let mut s = String::new();
        for i in 0..n {
            if i > 0 {
                s.push(' ');
            }
            s.push_str(WORDS[self.rng.gen_range(0..WORDS.len())]);
        }
        s
    }
    fn time(&mut self) -> i64 {
        self.seq += 1;
        BASE_TS + (self.seq as i64) * 1_000_003 + self.rng.gen_range(0..1000)
    }
    fn todo(&mut self, lists: &[(Uuid, String)]) -> Todo {
        let completed = self.rng.gen_bool(0.3);
        Todo {
            id: self.uuid(),
            created_at: self.time(),
            completed_at: if completed { Some(self.time()) } else { None },
            description: self.text(),
            completed,
            created_by: Some(format!("user-{}", self.client)),
            completed_by: if completed {
                Some(format!("user-{}", self.client))
            } else {
                None
            },
            list_id: lists[self.rng.gen_range(0..lists.len())].0,
        }
    }
    fn lists(&mut self, n: usize) -> Vec<(Uuid, String)> {
        (0..n)
            .map(|i| (self.uuid(), format!("list {i} of client {}", self.client)))
            .collect()
    }
    fn patch(&mut self) -> Vec<Field> {
        match self.rng.gen_range(0..4) {
            0 => vec![Field::Description(self.text())],
            1 => vec![Field::Completed(self.rng.gen_bool(0.5))],
            2 => {
                let t = self.time();
                vec![Field::Completed(true), Field::CompletedAt(Some(t))]
            }
            _ => vec![
                Field::Description(self.text()),
                Field::CompletedBy(Some(format!("user-{}", self.client))),
            ],
        }
    }
}

/// The W1 mix for `clients` clients splitting `total` ops: 60 % PUT of new rows, 30 % PATCH of
/// 1–2 columns of existing rows, 10 % DELETE of existing rows, shuffled. `chunk` is the request
/// size within which no row is patched twice.
pub fn mixed(seed: u64, total: usize, clients: usize, chunk: usize) -> Load {
    let clients = (0..clients)
        .map(|c| {
            let n = total / clients + usize::from(c < total % clients);
            let mut g = Gen::new(seed, 1, c);
            let lists = g.lists(4);
            let n_del = n / 10;
            let n_patch = n * 3 / 10;
            let n_put = n - n_del - n_patch;
            let pool = 1000.max(chunk * 2);
            let seed_rows: Vec<Todo> = (0..pool + n_del).map(|_| g.todo(&lists)).collect();
            let mut kinds: Vec<u8> = [vec![0u8; n_put], vec![1; n_patch], vec![2; n_del]].concat();
            kinds.shuffle(&mut g.rng);
            let mut ops = Vec::with_capacity(n);
            let mut patched_in_chunk: HashSet<usize> = HashSet::new();
            let mut next_delete = pool;
            for (i, k) in kinds.into_iter().enumerate() {
                if i % chunk == 0 {
                    patched_in_chunk.clear();
                }
                ops.push(match k {
                    0 => Op::Put(g.todo(&lists)),
                    1 => {
                        let row = loop {
                            let r = g.rng.gen_range(0..pool);
                            if patched_in_chunk.insert(r) {
                                break r;
                            }
                        };
                        Op::Patch(seed_rows[row].id, g.patch())
                    }
                    _ => {
                        next_delete += 1;
                        Op::Delete(seed_rows[next_delete - 1].id)
                    }
                });
            }
            ClientLoad {
                lists,
                seed: seed_rows,
                ops,
            }
        })
        .collect();
    Load { clients }
}

/// Only PUTs of new rows (W2, W3), split among `clients`, with no pre-seeded rows.
pub fn puts(seed: u64, total: usize, clients: usize) -> Load {
    let clients = (0..clients)
        .map(|c| {
            let n = total / clients + usize::from(c < total % clients);
            let mut g = Gen::new(seed, 2, c);
            let lists = g.lists(4);
            let ops = (0..n).map(|_| Op::Put(g.todo(&lists))).collect();
            ClientLoad {
                lists,
                seed: Vec::new(),
                ops,
            }
        })
        .collect();
    Load { clients }
}

impl Load {
    pub fn total_ops(&self) -> usize {
        self.clients.iter().map(|c| c.ops.len()).sum()
    }

    /// The `todos` table after all ops, keyed (and so sorted) by id.
    pub fn expected(&self) -> BTreeMap<Uuid, Todo> {
        let mut rows = BTreeMap::new();
        for c in &self.clients {
            for t in &c.seed {
                rows.insert(t.id, t.clone());
            }
            for op in &c.ops {
                match op {
                    Op::Put(t) => {
                        rows.insert(t.id, t.clone());
                    }
                    Op::Patch(id, fields) => {
                        if let Some(row) = rows.get_mut(id) {
                            for f in fields {
                                f.apply(row);
                            }
                        }
                    }
                    Op::Delete(id) => {
                        rows.remove(id);
                    }
                }
            }
        }
        rows
    }
}

/// One operation in the reference contract's shape.
pub fn op_json(op: &Op, tx_id: u64) -> Value {
    let mut o = Map::new();
    let (kind, data) = match op {
        Op::Put(t) => {
            let mut d = Map::new();
            d.insert("created_at".into(), json!(ts(t.created_at)));
            d.insert(
                "completed_at".into(),
                t.completed_at.map(ts).map_or(Value::Null, Value::String),
            );
            d.insert("description".into(), json!(t.description));
            d.insert("completed".into(), json!(if t.completed { 1 } else { 0 }));
            d.insert("created_by".into(), json!(t.created_by));
            d.insert("completed_by".into(), json!(t.completed_by));
            d.insert("list_id".into(), json!(t.list_id.to_string()));
            ("PUT", Some(d))
        }
        Op::Patch(_, fields) => (
            "PATCH",
            Some(
                fields
                    .iter()
                    .map(|f| (f.column().to_owned(), f.json()))
                    .collect(),
            ),
        ),
        Op::Delete(_) => ("DELETE", None),
    };
    o.insert("op".into(), json!(kind));
    o.insert("table".into(), json!("todos"));
    o.insert("id".into(), json!(op.id().to_string()));
    o.insert("transaction_id".into(), json!(tx_id));
    if let Some(d) = data {
        o.insert("op_data".into(), Value::Object(d));
    }
    Value::Object(o)
}

/// A request body: the given client transactions, in order. Transaction ids continue from
/// `first_tx_id`.
pub fn body(txs: &[&[Op]], first_tx_id: u64) -> Vec<u8> {
    let transactions: Vec<Value> = txs
        .iter()
        .enumerate()
        .map(|(i, ops)| {
            let id = first_tx_id + i as u64;
            json!({ "transaction_id": id, "crud": ops.iter().map(|o| op_json(o, id)).collect::<Vec<_>>() })
        })
        .collect();
    serde_json::to_vec(&json!({ "transactions": transactions })).expect("serialisable")
}
