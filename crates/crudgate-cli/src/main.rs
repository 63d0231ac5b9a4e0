//! The crudgate server: loads configuration, sets up logging, binds and serves. Everything
//! else lives in the `crudgate` library.

mod settings;

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use crudgate::auth::Authenticator;
use crudgate::{AppState, Engine};
use tokio::sync::Notify;

use settings::{Args, Command, RejectionsCommand, Settings};

// The server allocates and frees many small strings per operation (JSON values, SQL text
// parameters); in paired crudgate-bench runs mimalloc cut the CPU per W1 operation by 10–30 %
// against glibc's allocator. It is built without transparent huge pages, which more than
// doubled the peak RSS. Embedders pick their own allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    raise_open_files_limit();
    let args = Args::parse();
    let settings = Settings::load(&args)?;
    init_logging(&settings.log_format);
    if let Some(Command::Rejections(cmd)) = &args.command {
        return rejections(&settings, cmd).await;
    }

    // Zero configuration: a private throwaway cluster with the demo schema, removed on exit.
    let (database_url, _cluster) = match settings.database_url.as_deref() {
        Some(url) if !url.is_empty() => (url.to_owned(), None),
        _ => {
            let cluster = tokio::task::spawn_blocking(crudgate_pgtemp::Cluster::start)
                .await?
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("no database configured, and no throwaway one could be started")?;
            let url = cluster.url();
            create_demo_schema(&url).await?;
            println!("database: {url}");
            (url, Some(cluster))
        }
    };
    let auth = Authenticator::new(&settings.auth).map_err(|e| anyhow::anyhow!("auth: {e}"))?;
    let engine = Engine::connect(&database_url, settings.engine.clone(), Vec::new()).await?;
    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    if _cluster.is_some() {
        println!(
            "try: curl -s http://{addr}/api/data -H 'content-type: application/json' -d \
             '{{\"transactions\":[{{\"transaction_id\":1,\"crud\":[\
             {{\"op\":\"PUT\",\"table\":\"lists\",\"id\":\"8f4c5a0e-0a0b-4c6e-9d1a-2b3c4d5e6f70\",\
             \"op_data\":{{\"name\":\"groceries\"}}}},\
             {{\"op\":\"PUT\",\"table\":\"todos\",\"id\":\"3a4b5c6d-7e8f-4a0b-8c1d-2e3f4a5b6c7d\",\
             \"op_data\":{{\"description\":\"milk\",\"completed\":0,\
             \"list_id\":\"8f4c5a0e-0a0b-4c6e-9d1a-2b3c4d5e6f70\"}}}}]}}]}}'"
        );
    }
    tracing::info!(%addr, "crudgate listening");

    spawn_schema_reload_on_sighup(engine.clone());
    let state = AppState::new(engine, auth);
    // The first SIGTERM or Ctrl-C drains; a second one stops waiting (and still removes a
    // throwaway cluster on the way out): an operator should never need SIGKILL.
    let (first, second) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    tokio::spawn(count_signals(first.clone(), second.clone()));
    let drained = crudgate::serve(listener, state, async move { first.notified().await });
    tokio::select! {
        served = drained => served?,
        () = second.notified() => tracing::warn!("second signal: stopped without waiting"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// The operator commands on the rejections table of a configured database.
async fn rejections(settings: &Settings, cmd: &RejectionsCommand) -> anyhow::Result<()> {
    let url = settings
        .database_url
        .as_deref()
        .filter(|u| !u.is_empty())
        .context("rejections commands need --database-url (or DATABASE_URL)")?;
    let engine = Engine::connect(url, settings.engine.clone(), Vec::new()).await?;
    match cmd {
        RejectionsCommand::List {
            user,
            table,
            code,
            since,
            limit,
            json,
        } => {
            let filter = crudgate::rejections::Filter {
                user_id: user.clone(),
                table: table.clone(),
                code: code.clone(),
                since_secs: *since,
                limit: Some(*limit),
            };
            let rows = engine
                .list_rejections(&filter)
                .await
                .map_err(anyhow::Error::msg)?;
            if *json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                println!(
                    "{:<36}  {:<24}  {:<12}  {:<8}  {:>3}  {:<16}  {:<6}  {:<22}  message",
                    "id", "created_at", "user", "tx", "op#", "table", "op", "code"
                );
                // Clients chose most of these strings: no escape sequence reaches the terminal.
                let shown = |s: Option<&str>| -> String {
                    s.unwrap_or("-")
                        .chars()
                        .map(|c| match c.is_control() {
                            true => c.escape_default().to_string(),
                            false => c.to_string(),
                        })
                        .collect()
                };
                for r in &rows {
                    println!(
                        "{:<36}  {:<24}  {:<12}  {:<8}  {:>3}  {:<16}  {:<6}  {:<22}  {}",
                        r.id,
                        r.created_at,
                        shown(r.user_id.as_deref()),
                        shown(r.transaction_id.as_deref()),
                        r.operation_index,
                        shown(r.table_name.as_deref()),
                        shown(r.op.as_deref()),
                        shown(Some(&r.error_code)),
                        shown(Some(&r.message))
                    );
                }
            }
        }
        RejectionsCommand::Replay { ids } => {
            if engine.config().tables.is_empty() {
                eprintln!(
                    "warning: no write rules are configured; replay with the server's --config so \
                     the same rules (owners, columns, server-set values) apply"
                );
            }
            let mut failed = false;
            for id in ids {
                let result = engine
                    .replay_rejection(id)
                    .await
                    .map_err(anyhow::Error::msg)?;
                failed |= !matches!(result, crudgate::protocol::TxResult::Success);
                println!("{id} {}", serde_json::to_string(&result)?);
            }
            if failed {
                std::process::exit(1);
            }
        }
        RejectionsCommand::Purge { older_than } => {
            let n = engine
                .purge_rejections(*older_than)
                .await
                .map_err(anyhow::Error::msg)?;
            println!("purged {n} rejections");
        }
    }
    Ok(())
}

async fn create_demo_schema(url: &str) -> anyhow::Result<()> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let task = tokio::spawn(conn);
    client.batch_execute(crudgate::DEMO_SCHEMA).await?;
    drop(client);
    let _ = task.await;
    Ok(())
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Notifies `first` at the first SIGTERM or Ctrl-C, `second` at the next one.
async fn count_signals(first: Arc<Notify>, second: Arc<Notify>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    for (i, notify) in [first, second].into_iter().enumerate() {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        if i == 0 {
            tracing::info!(
                "shutting down: finishing requests in flight (a second signal stops now)"
            );
        }
        notify.notify_one();
    }
}

/// `kill -HUP` reloads the catalog after a migration without a restart.
fn spawn_schema_reload_on_sighup(engine: Engine) {
    use tokio::signal::unix::{signal, SignalKind};
    let engine = Arc::new(engine);
    tokio::spawn(async move {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            if let Err(e) = engine.refresh_schema().await {
                tracing::warn!(error = %e, "schema reload failed");
            }
        }
    });
}

/// Raises the soft limit on open files to the hard one: each client connection takes a file
/// descriptor, and the usual soft limit (1024) would cap the server far below what it serves.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
