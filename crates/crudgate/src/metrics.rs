//! Counters for operators, rendered in the Prometheus text format at `GET /metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident: $help:literal),* $(,)?) => {
        /// Monotonic counters since start.
        #[derive(Debug, Default)]
        pub struct Metrics { $(pub(crate) $name: AtomicU64,)* }

        impl Metrics {
            /// The Prometheus text exposition of every counter.
            pub fn render(&self) -> String {
                let mut out = String::new();
                $(
                    out.push_str(concat!("# HELP crudgate_", stringify!($name), " ", $help, "\n"));
                    out.push_str(concat!("# TYPE crudgate_", stringify!($name), " counter\n"));
                    out.push_str(&format!(
                        concat!("crudgate_", stringify!($name), " {}\n"),
                        self.$name.load(Ordering::Relaxed)
                    ));
                )*
                out
            }

            /// One counter's value by its name without the `crudgate_` prefix
            /// (`"requests_total"`).
            pub fn get(&self, name: &str) -> Option<u64> {
                match name {
                    $(stringify!($name) => Some(self.$name.load(Ordering::Relaxed)),)*
                    _ => None,
                }
            }
        }
    };
}

counters! {
    requests_total: "Upload requests that reached the engine.",
    requests_without_client_id_total: "Requests without a client id: applied without deduplication, like the reference backend.",
    transactions_applied_total: "Client transactions committed.",
    transactions_rejected_total: "Client transactions rejected (fatal_error).",
    transactions_replayed_total: "Client transactions already decided, answered from the ledger without applying them again.",
    idempotency_conflicts_total: "Transaction ids resent with different content.",
    retryable_total: "Client transactions answered retryable_error (or 503).",
    fast_path_fallbacks_total: "Requests whose bulk attempt failed and were replayed one operation at a time.",
    group_commits_total: "Database transactions that committed several small requests together (group commit).",
    grouped_requests_total: "Requests committed as members of a group commit.",
    group_fallbacks_total: "Group commits undone (a member failed, or a lock was held elsewhere) whose requests were applied again one by one.",
}

impl Metrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
