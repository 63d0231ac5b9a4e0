//! Throwaway PostgreSQL clusters.
//!
//! [`Cluster::start`] runs `initdb` into a fresh temporary directory and starts a
//! private `postgres` on `127.0.0.1` and a free TCP port, using the server
//! binaries already installed on the machine (see [`find_bin_dir`]). Dropping the
//! [`Cluster`] stops the server and deletes the directory. Nothing here is async;
//! the calls block for the second or two that `initdb` and startup take.
//!
//! ```no_run
//! let cluster = crudgate_pgtemp::Cluster::start()?;
//! let url = cluster.url(); // postgres://postgres@127.0.0.1:PORT/postgres
//! # Ok::<(), crudgate_pgtemp::Error>(())
//! ```
//!
//! Test binaries that want one server for all their tests use [`shared`].
//!
//! # Running as root
//!
//! PostgreSQL refuses to run as root. When the effective uid is 0, the cluster
//! directory is handed to the `postgres` system user (or `nobody` if there is no
//! such user) and `initdb`/`pg_ctl` run as that user. The cluster then lives
//! under `$TMPDIR` only if every user can enter it, and under `/tmp` otherwise.
//!
//! # Leftovers
//!
//! A `Cluster` stored in a `static` is never dropped, so its server would outlive
//! the process; use [`shared`], which registers an exit handler, instead. A process
//! killed by a signal (or one that aborts) does not run destructors or exit
//! handlers either and leaves its cluster running: the directories are named
//! `crudgate-pgtemp-*` under the temporary directory.

use std::ffi::CString;
use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long to wait for a server to accept connections (and to stop).
const WAIT: Duration = Duration::from_secs(30);
/// How many ports to try when the one picked was taken in the meantime.
const PORT_ATTEMPTS: usize = 3;
/// The binaries a directory must hold to be usable.
const REQUIRED: [&str; 3] = ["initdb", "pg_ctl", "postgres"];
/// The file (in the data directory) holding our server settings.
const CONF_FILE: &str = "crudgate-pgtemp.conf";

/// What can go wrong while starting, stopping or restarting a cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The PostgreSQL server binaries were not found; the payload says where we looked.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found (looked in: {0}). \
         Install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`; \
         macOS: `brew install postgresql`), or use an existing server instead \
         by passing --database-url or setting DATABASE_URL"
    )]
    NotInstalled(String),
    /// An operating-system call failed.
    #[error("{action}: {source}")]
    Io {
        /// What we were doing.
        action: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A PostgreSQL program failed; `detail` has its output and the end of the server log.
    #[error("{action} failed: {detail}")]
    Failed {
        /// What we were doing.
        action: String,
        /// The program's output and the end of the server log.
        detail: String,
    },
    /// The server did not accept connections in time.
    #[error("the server on port {port} did not accept connections within {secs} s{log}")]
    Timeout {
        /// The port it should listen on.
        port: u16,
        /// How long we waited.
        secs: u64,
        /// The end of the server log, if any.
        log: String,
    },
}

fn io_err(action: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let action = action.into();
    move |source| Error::Io { action, source }
}

/// Settings for [`Cluster::start_with`].
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Keep PostgreSQL's crash safety (`fsync`, `synchronous_commit`,
    /// `full_page_writes` on). Off by default: faster, and fine for data that
    /// is thrown away, but a killed *machine* may lose committed data.
    /// (Stopping with [`Cluster::stop`] or a `pg_ctl stop -m immediate` loses
    /// nothing either way.)
    pub durable: bool,
    /// Use the binaries in this directory instead of searching with [`find_bin_dir`].
    pub bin_dir: Option<PathBuf>,
}

/// The unprivileged user the server runs as when we are root.
#[derive(Debug, Clone, Copy)]
struct Owner {
    uid: libc::uid_t,
    gid: libc::gid_t,
}

/// A private, throwaway PostgreSQL cluster.
///
/// Dropping it stops the server (fast shutdown) and removes its directory. A
/// `Cluster` held in a `static` is never dropped: use [`shared`] for that.
#[derive(Debug)]
pub struct Cluster {
    bin_dir: PathBuf,
    /// The directory we created; holds `data/` and `postgres.log`.
    root: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    port: u16,
    owner: Option<Owner>,
    /// Whether we think the server runs; serialises stop/restart.
    running: Mutex<bool>,
}

impl Cluster {
    /// Starts a non-durable cluster (`fsync=off`), see [`ClusterOptions`].
    pub fn start() -> Result<Cluster, Error> {
        Cluster::start_with(ClusterOptions::default())
    }

    /// Creates and starts a cluster; returns once it accepts connections.
    pub fn start_with(opts: ClusterOptions) -> Result<Cluster, Error> {
        let bin_dir = match opts.bin_dir {
            Some(dir) => find_bin_dir_in([dir])?,
            None => find_bin_dir()?,
        };
        let owner = server_owner()?;
        let root = make_root_dir(owner)?;
        // From here on, dropping `cluster` cleans up whatever was created.
        let mut cluster = Cluster {
            data_dir: root.join("data"),
            log_file: root.join("postgres.log"),
            root,
            bin_dir,
            port: 0,
            owner,
            running: Mutex::new(false),
        };
        cluster.init(opts.durable)?;
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            cluster.port = free_port()?;
            cluster.write_conf(opts.durable)?;
            match cluster.start_server() {
                Ok(()) => {
                    *cluster.running.get_mut().unwrap_or_else(|e| e.into_inner()) = true;
                    return Ok(cluster);
                }
                // Most likely somebody took the port between our check and the server's bind.
                Err(e) => {
                    cluster.kill_leftover();
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of database `database` (which the caller creates) as user `postgres`;
    /// `database` goes into the URL as is, so keep it to plain identifiers.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The TCP port the server listens on (on 127.0.0.1). It stays the same across [`Cluster::restart`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (also where the server's Unix socket is).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log: warnings, errors and the server's LOG lines (startup, shutdown).
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The directory holding the PostgreSQL binaries in use (for `psql` and friends).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Stops the server (`pg_ctl stop -m fast`) but keeps the data, e.g. to test
    /// how a client copes with a lost database. Does nothing if it is already stopped.
    pub fn stop(&self) -> Result<(), Error> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if *running {
            self.pg_ctl_stop("fast")?;
            *running = false;
        }
        Ok(())
    }

    /// Starts a stopped server again on the same port and waits until it accepts
    /// connections. Does nothing if it is running.
    pub fn restart(&self) -> Result<(), Error> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if !*running {
            if let Err(e) = self.start_server() {
                self.kill_leftover();
                return Err(e);
            }
            *running = true;
        }
        Ok(())
    }

    /// A command for one of the PostgreSQL programs, run as the unprivileged
    /// owner if we are root, from the cluster directory, with the libpq
    /// variables that could redirect it removed.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.current_dir(&self.root).stdin(Stdio::null());
        for var in [
            "PGDATA",
            "PGPORT",
            "PGHOST",
            "PGHOSTADDR",
            "PGUSER",
            "PGDATABASE",
            "PGOPTIONS",
        ] {
            cmd.env_remove(var);
        }
        if let Some(owner) = self.owner {
            cmd.uid(owner.uid).gid(owner.gid);
        }
        cmd
    }

    fn init(&self, durable: bool) -> Result<(), Error> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&self.data_dir).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        if !durable {
            cmd.arg("--no-sync");
        }
        let out = run(cmd, "initdb")?;
        if !out.status.success() {
            return Err(Error::Failed {
                action: "initdb".into(),
                detail: describe(&out, ""),
            });
        }
        // Our settings live in their own file so a retry can rewrite the port.
        let conf = self.data_dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).map_err(io_err("reading postgresql.conf"))?;
        let _ = writeln!(text, "\ninclude '{CONF_FILE}'");
        std::fs::write(&conf, text).map_err(io_err("writing postgresql.conf"))
    }

    fn write_conf(&self, durable: bool) -> Result<(), Error> {
        let socket_dir = self.data_dir.to_string_lossy().replace('\'', "''");
        let mut text = format!(
            "# Written by crudgate-pgtemp.\n\
             port = {}\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{socket_dir}'\n\
             max_connections = 200\n\
             log_min_messages = warning\n",
            self.port
        );
        if !durable {
            text.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        let path = self.data_dir.join(CONF_FILE);
        std::fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))?;
        self.give_to_owner(&path)
    }

    /// `pg_ctl start -w`, then a TCP check that the port answers.
    fn start_server(&self) -> Result<(), Error> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("start")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-w", "-t", &WAIT.as_secs().to_string()]);
        let out = run(cmd, "pg_ctl start")?;
        if !out.status.success() {
            return Err(Error::Failed {
                action: format!("starting the server on port {}", self.port),
                detail: describe(&out, &self.log_tail()),
            });
        }
        let deadline = Instant::now() + WAIT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    port: self.port,
                    secs: WAIT.as_secs(),
                    log: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<(), Error> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("stop").arg("-D").arg(&self.data_dir).args([
            "-m",
            mode,
            "-w",
            "-t",
            &WAIT.as_secs().to_string(),
        ]);
        let out = run(cmd, "pg_ctl stop")?;
        if out.status.success() {
            Ok(())
        } else {
            Err(Error::Failed {
                action: format!("stopping the server on port {} ({mode})", self.port),
                detail: describe(&out, &self.log_tail()),
            })
        }
    }

    /// Last resort after a failed start or stop: SIGKILL whatever postmaster the
    /// pid file names, so that no server outlives us.
    fn kill_leftover(&self) {
        let pid_file = self.data_dir.join("postmaster.pid");
        let Ok(text) = std::fs::read_to_string(&pid_file) else {
            return;
        };
        if let Some(pid) = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
        {
            if pid > 0 {
                // SAFETY: kill(2) with a positive pid has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }

    /// Stops the server (`mode` is a `pg_ctl -m` mode) if running, and deletes the directory.
    fn destroy(&self, mode: &str) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if *running && self.pg_ctl_stop(mode).is_err() {
            let _ = self.pg_ctl_stop("immediate");
            self.kill_leftover();
        }
        *running = false;
        let _ = std::fs::remove_dir_all(&self.root);
    }

    fn give_to_owner(&self, path: &Path) -> Result<(), Error> {
        match self.owner {
            Some(owner) => chown(path, owner),
            None => Ok(()),
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        if tail.is_empty() {
            tail
        } else {
            format!("\nserver log ({}):\n{tail}", self.log_file.display())
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.destroy("fast");
    }
}

/// The one cluster of this process, started on first use; for test binaries.
///
/// A `static` is never dropped, so this cluster is instead stopped
/// (`pg_ctl stop -m immediate`) and deleted by a `libc::atexit` handler, which
/// runs when `main` returns or on `std::process::exit` (as the test harness
/// does), but not when the process is killed by a signal or aborts.
///
/// # Panics
///
/// If the cluster cannot be started (on every call, with the same message).
pub fn shared() -> &'static Cluster {
    static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
    static CLEANUP: OnceLock<&'static Cluster> = OnceLock::new();

    extern "C" fn cleanup() {
        if let Some(cluster) = CLEANUP.get() {
            cluster.destroy("immediate");
        }
    }

    let started = SHARED.get_or_init(|| {
        let cluster = Cluster::start().map_err(|e| e.to_string())?;
        Ok(cluster)
    });
    match started {
        Ok(cluster) => {
            CLEANUP.get_or_init(|| {
                // SAFETY: registering a plain `extern "C" fn()`; it runs at most once, at exit.
                unsafe { libc::atexit(cleanup) };
                cluster
            });
            cluster
        }
        Err(e) => panic!("crudgate-pgtemp: could not start the shared cluster: {e}"),
    }
}

/// Finds the directory holding `initdb`, `pg_ctl` and `postgres`: the first
/// such directory on `PATH`, then the highest-versioned
/// `/usr/lib/postgresql/*/bin`, then `/usr/local/pgsql/bin`.
///
/// When the binaries found on `PATH` are symlinks (as with Debian's
/// `/usr/local/bin` links), the directory they point to is returned if it holds
/// all three, since it also holds `psql`, `pg_isready` and the rest.
pub fn find_bin_dir() -> Result<PathBuf, Error> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    candidates.extend(debian_bin_dirs(Path::new("/usr/lib/postgresql")));
    candidates.push(PathBuf::from("/usr/local/pgsql/bin"));
    find_bin_dir_in(candidates)
}

/// Like [`find_bin_dir`], but searches only `candidates`, in order.
///
/// Returns [`Error::NotInstalled`] naming the candidates if none qualifies.
pub fn find_bin_dir_in(candidates: impl IntoIterator<Item = PathBuf>) -> Result<PathBuf, Error> {
    let mut looked = Vec::new();
    for dir in candidates {
        if has_binaries(&dir) {
            // Prefer the real directory behind a symlinked initdb.
            let real = std::fs::canonicalize(dir.join("initdb"))
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .filter(|real| has_binaries(real));
            return Ok(real.unwrap_or(dir));
        }
        looked.push(dir.display().to_string());
    }
    if looked.is_empty() {
        looked.push("nowhere: no candidate directories".into());
    }
    Err(Error::NotInstalled(looked.join(", ")))
}

fn has_binaries(dir: &Path) -> bool {
    REQUIRED.iter().all(|name| is_executable(&dir.join(name)))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `<base>/*/bin`, highest version first (`15` before `9.6`).
fn debian_bin_dirs(base: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let key = name
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((key, e.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

/// Who the server runs as: `None` (ourselves) unless we are root.
fn server_owner() -> Result<Option<Owner>, Error> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        if let Some(owner) = lookup_user(name) {
            return Ok(Some(owner));
        }
    }
    Err(Error::Failed {
        action: "finding a user to run PostgreSQL as".into(),
        detail: "running as root, and neither a `postgres` nor a `nobody` user exists \
                 (PostgreSQL refuses to run as root)"
            .into(),
    })
}

fn lookup_user(name: &str) -> Option<Owner> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid (if meaningless) value; getpwnam_r fills it.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the duration of the call and `buf.len()` is its size.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some(Owner {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

fn chown(path: &Path, owner: Owner) -> Result<(), Error> {
    std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid))
        .map_err(io_err(format!("chown {}", path.display())))
}

/// Creates `$TMPDIR/crudgate-pgtemp-<pid>-<n>-<nanos>` (mode 0700), owned by
/// `owner` if given (then in `/tmp` if `owner` could not reach `$TMPDIR`).
fn make_root_dir(owner: Option<Owner>) -> Result<PathBuf, Error> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let mut tmp = std::env::temp_dir();
    // A root-only $TMPDIR (say under /root) is out of the server user's reach.
    if owner.is_some() && !world_traversable(&tmp) {
        tmp = PathBuf::from("/tmp");
    }
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = tmp.join(format!(
            "crudgate-pgtemp-{}-{n}-{nanos:x}",
            std::process::id()
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                let setup = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err(format!("chmod {}", dir.display())))
                    .and_then(|()| owner.map_or(Ok(()), |o| chown(&dir, o)));
                if let Err(e) = setup {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
                return Ok(dir);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
        }
    }
}

/// Whether every directory from `/` down to `dir` can be entered by anybody.
fn world_traversable(dir: &Path) -> bool {
    dir.ancestors()
        .all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// A port that was free a moment ago (bind 127.0.0.1:0 and let go).
fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(io_err("finding a free port on 127.0.0.1"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("finding a free port on 127.0.0.1"))?
        .port();
    Ok(port)
}

fn run(mut cmd: Command, what: &str) -> Result<Output, Error> {
    cmd.output().map_err(io_err(format!(
        "running {what} ({})",
        Path::new(cmd.get_program()).display()
    )))
}

fn describe(out: &Output, log_tail: &str) -> String {
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    format!(
        "{} (stdout: {}; stderr: {}){log_tail}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

// `shared()` keeps a `Cluster` in a `static`, which needs `Sync`.
const _: fn() = || {
    fn sync_send<T: Sync + Send>() {}
    sync_send::<Cluster>();
};
