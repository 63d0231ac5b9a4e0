//! Where the time of W2 and W3 goes, without HTTP: parsing the body, `Engine::apply`, and the
//! raw SQL for the same ops, each on a fresh database (3 times, medians). Diagnosis aid:
//! `cargo run --release -p crudgate-bench --example breakdown [-- --non-durable]`.

use std::time::Instant;

use crudgate::config::Planner;
use crudgate::{Context, Engine, EngineConfig};
use crudgate_bench::gen::{self, Load};
use crudgate_bench::{db, stats::median};

async fn fresh(
    cluster: &crudgate_pgtemp::Cluster,
    admin: &tokio_postgres::Client,
    n: &mut usize,
    load: &Load,
) -> String {
    *n += 1;
    let name = format!("bd_{n}");
    let url = cluster.url_for(&name);
    db::prepare(admin, &url, &name, load).await.unwrap();
    url
}

/// W2's rows the way crudgate sends them: values as text arrays, cast in SQL.
async fn text_arrays(url: &str, load: &Load) -> f64 {
    let c = db::connect(url).await.unwrap();
    let rows: Vec<&gen::Todo> = load.clients[0]
        .ops
        .iter()
        .map(|o| match o {
            gen::Op::Put(t) => t,
            _ => unreachable!("W2 is PUTs only"),
        })
        .collect();
    let col =
        |f: &dyn Fn(&gen::Todo) -> Option<String>| rows.iter().map(|t| f(t)).collect::<Vec<_>>();
    let params = [
        col(&|t| Some(t.id.to_string())),
        col(&|t| Some(gen::ts(t.created_at))),
        col(&|t| t.completed_at.map(gen::ts)),
        col(&|t| Some(t.description.clone())),
        col(&|t| Some(t.completed.to_string())),
        col(&|t| t.created_by.clone()),
        col(&|t| t.completed_by.clone()),
        col(&|t| Some(t.list_id.to_string())),
    ];
    let sql = "insert into todos (id, created_at, completed_at, description, completed, created_by, completed_by, list_id) \
        select v0::uuid, v1::timestamptz, v2::timestamptz, v3::text, v4::boolean, v5::text, v6::text, v7::uuid \
        from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[]) \
        as _v(v0, v1, v2, v3, v4, v5, v6, v7) on conflict (id) do update set created_at = excluded.created_at, \
        completed_at = excluded.completed_at, description = excluded.description, completed = excluded.completed, \
        created_by = excluded.created_by, completed_by = excluded.completed_by, list_id = excluded.list_id";
    let st = c.prepare(sql).await.unwrap();
    let p: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        params.iter().map(|v| v as _).collect();
    let t = Instant::now();
    c.batch_execute("begin").await.unwrap();
    c.execute(&st, &p).await.unwrap();
    c.batch_execute("commit").await.unwrap();
    t.elapsed().as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    let durable = !std::env::args().any(|a| a == "--non-durable");
    let cluster = crudgate_pgtemp::Cluster::start_with(crudgate_pgtemp::ClusterOptions {
        durable,
        ..Default::default()
    })
    .unwrap();
    let admin = db::connect(&cluster.url()).await.unwrap();
    let mut n = 0;
    let ctx = Context::default();
    for (name, load, per_req) in [
        (
            "W2 10,000 PUTs, 1 request",
            gen::puts(42, 10_000, 1),
            10_000,
        ),
        ("W3 1,000 single-PUT requests", gen::puts(43, 1_000, 1), 1),
        (
            "W1 10,000 mixed, 100-op requests",
            gen::mixed(42, 10_000, 1, 100),
            100,
        ),
    ] {
        let want = load.expected();
        let bodies: Vec<Vec<u8>> = crudgate_bench::http::requests(&load, per_req, per_req)
            .remove(0)
            .into_iter()
            .map(|r| r.body)
            .collect();
        let (mut parse, mut apply, mut naive, mut raw, mut text) =
            (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..3 {
            let t = Instant::now();
            let batches: Vec<_> = bodies
                .iter()
                .map(|b| crudgate::protocol::parse_batch(b).unwrap())
                .collect();
            parse.push(t.elapsed().as_secs_f64() * 1e3);
            for (planner, out) in [(Planner::Bulk, &mut apply), (Planner::Naive, &mut naive)] {
                let url = fresh(&cluster, &admin, &mut n, &load).await;
                let cfg = EngineConfig {
                    planner,
                    allow_unlisted_tables: true,
                    ..EngineConfig::default()
                };
                let engine = Engine::connect(&url, cfg, vec![]).await.unwrap();
                let t = Instant::now();
                for b in &batches {
                    let o = engine.apply(ctx.clone(), b.clone()).await;
                    assert!(o
                        .results
                        .iter()
                        .all(|r| matches!(r, crudgate::protocol::TxResult::Success)));
                }
                out.push(t.elapsed().as_secs_f64() * 1e3);
                drop(engine);
                db::verify(&url, &want).await.unwrap();
            }
            let url = fresh(&cluster, &admin, &mut n, &load).await;
            let s = db::run_raw(&url, &load, per_req).await.unwrap();
            raw.push(s.secs * 1e3);
            db::verify(&url, &want).await.unwrap();
            if per_req == 10_000 {
                let url = fresh(&cluster, &admin, &mut n, &load).await;
                text.push(text_arrays(&url, &load).await);
                db::verify(&url, &want).await.unwrap();
            }
        }
        println!(
            "{name} ({}): parse {:.1} ms, Engine::apply bulk {:.1} ms, naive {:.1} ms, raw SQL {:.1} ms, raw SQL with text arrays {:.1} ms",
            if durable { "durable" } else { "fsync off" },
            median(parse),
            median(apply),
            median(naive),
            median(raw),
            median(text)
        );
    }
}
