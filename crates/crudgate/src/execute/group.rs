//! Group commit: small requests that arrive while another is being applied share one database
//! transaction, so that one COMMIT (one WAL flush) serves them all.
//!
//! Single-row requests are bound by their COMMIT: a few thousand a second from one connection,
//! and not twice that from eight, on a machine like the one crudgate is measured on. So a small
//! request goes through a lane; while the lane is busy it waits, and the next group takes every
//! waiting request it can. The leader is one of the group's own requests (no task of its own).
//! It applies the members in order, each as it would be applied alone (its identity, its
//! client's lock, its data, its ledger entries), then sends one COMMIT. The operations of
//! members of one caller are planned together as if they were the transactions of one request,
//! so many single-row PUTs become one insert (never merged across transactions where that could
//! change an answer, see `plan::bulk`).
//!
//! A group commits all or nothing, and nothing is never an answer: any failure (a constraint,
//! a lock held too long, a deadlock, a resent transaction) undoes the group, and every member is
//! then applied on its own, as if it had never waited. Grouping changes when requests commit,
//! never what they answer. So that no request holds up others:
//! - whatever runs in the lane waits at most 20 ms for any lock and runs no statement for
//!   more than 500 ms (`lane_begin`), then falls back: a slow trigger of one member holds the
//!   others up that long at most, not for the statement timeout;
//! - a request waits at most `QUEUE_WAIT` for a group, then goes alone;
//! - the members of a group have distinct clients, so a client's requests keep their order.
//!
//! Identity: each member sets its own `app.user_id` (and claims) before its statements, so
//! policies, defaults and triggers see its user. The members of a group either all carry an
//! identity or none does, so that none sees another's. A check deferred to COMMIT would judge
//! all members at once (one member's row could satisfy another's foreign key) and see the last
//! member's identity, so where the schema has one, nothing is grouped.
//!
//! What members do share: the transaction's start time (`now()`), and duplicate NOTIFYs are
//! merged. A member whose COMMIT was lost with its connection is, when its ledger can tell
//! (a client id and transaction ids), applied again alone and answered from the ledger, where
//! alone it would have been answered 503.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::oneshot;

use super::{
    identity_sql, ledger_rows, pipelined_locks, run, Engine, Failure, Head, LedgerRows, Mode, Req,
    Tally,
};
use crate::config::EngineConfig;
use crate::metrics::Metrics;
use crate::plan::{self, Expect, OpRef, Param, RowOp, Stmt};
use crate::protocol::TxResult;
use crate::schema::Catalog;

/// Groups applied at once. Measured with single-PUT requests on 2 cores, one lane beat two,
/// three and four at 4 and 8 clients: concurrent groups split the waiting requests and their
/// COMMITs do not share WAL flushes well.
const LANES: usize = 1;
/// Most requests in one group.
const MAX_MEMBERS: usize = 32;
/// Larger requests are not grouped: their own statements already amortise their COMMIT.
const MAX_OPS: usize = 32;
/// How long a request waits for a place in a group before it is applied alone.
const QUEUE_WAIT: Duration = Duration::from_millis(100);
/// The longest a lane waits for a group to gather (see `Lanes::gather`).
const GATHER: Duration = Duration::from_millis(1);
/// How long a statement may run in a lane (or the configured statement timeout, if lower).
const LANE_STATEMENT_MS: u64 = 500;

/// Starts a transaction in a lane: a lock held elsewhere or a slow statement makes it fail
/// fast, not stall the lane.
pub(super) fn lane_begin(cfg: &EngineConfig) -> String {
    let ms = match cfg.statement_timeout_ms {
        0 => LANE_STATEMENT_MS,
        configured => configured.min(LANE_STATEMENT_MS),
    };
    format!("begin; set local lock_timeout = '20ms'; set local statement_timeout = '{ms}ms'")
}

/// The lane(s) and the requests waiting for one. Shared by the engine's clones.
#[derive(Default)]
pub(super) struct Lanes {
    state: Mutex<State>,
    /// Told when a request starts waiting.
    arrived: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    busy: usize,
    queue: VecDeque<Waiting>,
    next_id: u64,
    /// How many requests the last group had.
    last_size: usize,
}

/// A request, ready to run in anyone's group.
struct Member {
    /// Its caller: the user id and claims it writes as.
    caller: (Option<String>, Value),
    /// `identity_sql` for its caller: none without a user, or with both settings off.
    identity: Option<(String, Vec<String>)>,
    lock_key: Option<i64>,
    /// The operations to apply, in order.
    ops: Vec<(OpRef, RowOp)>,
    /// How many transactions the request has.
    txs: usize,
    /// After them: rejections to record, and its ledger entries (taken out when its group's
    /// statements are made).
    tail: Tail,
}

#[derive(Default)]
struct Tail {
    writes: Vec<Stmt<'static>>,
    ledger: Option<LedgerRows>,
}

/// What a request keeps for itself while its statements are in a group.
struct Planned {
    results: Vec<TxResult>,
    tally: Tally,
}

struct Waiting {
    id: u64,
    member: Box<Member>,
    turn: oneshot::Sender<Turn>,
}

enum Turn {
    /// A lane is yours: lead the next group.
    Lead(Lane, Box<Member>),
    /// Your group is over.
    Done(Verdict),
}

enum Queued {
    Waiting(u64, oneshot::Receiver<Turn>),
    /// A lane was free after all.
    Lead(Lane, Box<Member>),
}

/// What became of a request sent to a lane.
pub(super) enum Laned {
    /// Its answer: committed, or the database unavailable.
    Answered(Result<Vec<TxResult>, Failure>),
    /// Apply it alone. `Some`: it was alone in its lane, and this is how that attempt failed
    /// (its first attempt, unless the lane's lock timeout cut it short).
    Alone(Option<Failure>),
}

#[derive(Clone, Copy, Debug)]
enum Verdict {
    Committed,
    /// Undone (or never begun, for want of a connection): apply each member alone.
    Undone,
    /// The connection was lost with COMMIT sent: it may have been applied.
    Lost,
}

/// A lane held; handed to the next waiting request (or freed) when dropped, whatever happens
/// to its holder.
struct Lane(Option<Arc<Lanes>>);

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(lanes) = self.0.take() {
            lanes.hand_off();
        }
    }
}

impl Lanes {
    fn take_free(self: &Arc<Self>) -> Option<Lane> {
        let mut state = self.state.lock().expect("not poisoned");
        (state.busy < LANES).then(|| {
            state.busy += 1;
            Lane(Some(self.clone()))
        })
    }

    /// Waits in the queue, unless a lane was freed meanwhile.
    fn queue_up(self: &Arc<Self>, member: Member) -> Queued {
        let mut state = self.state.lock().expect("not poisoned");
        if state.busy < LANES {
            state.busy += 1;
            return Queued::Lead(Lane(Some(self.clone())), Box::new(member));
        }
        state.next_id += 1;
        let id = state.next_id;
        let (turn, rx) = oneshot::channel();
        state.queue.push_back(Waiting {
            id,
            member: Box::new(member),
            turn,
        });
        self.arrived.notify_waiters();
        Queued::Waiting(id, rx)
    }

    /// Leaves the queue; false if a group took the request already (or made it leader).
    fn leave(&self, id: u64) -> bool {
        let mut state = self.state.lock().expect("not poisoned");
        match state.queue.iter().position(|w| w.id == id) {
            Some(at) => {
                state.queue.remove(at);
                true
            }
            None => false,
        }
    }

    /// The waiting requests that can join a group led by a request like `leader`: other clients,
    /// the same kind of identity. The others keep their places.
    fn take_group(&self, lock_key: Option<i64>, identified: bool) -> Vec<Waiting> {
        let mut state = self.state.lock().expect("not poisoned");
        let mut clients: HashSet<i64> = lock_key.into_iter().collect();
        let waiting = state.queue.len();
        let mut group = Vec::new();
        let mut kept = VecDeque::new();
        while let Some(w) = state.queue.pop_front() {
            let fits = group.len() + 1 < MAX_MEMBERS
                && w.member.identity.is_some() == identified
                && w.member.lock_key.is_none_or(|k| clients.insert(k));
            if fits {
                group.push(w);
            } else {
                kept.push_back(w);
            }
        }
        state.queue = kept;
        state.last_size = waiting + 1;
        group
    }

    /// Before a group is taken from a lane handed on under load: waits (briefly) until as many
    /// requests wait as the last group had, and at least one, so that the requests of a finished
    /// group, on their way back, make one group rather than one now and the rest a whole group
    /// later. (Measured with 2 clients: without it the two alternate alone in the lane, 2.8k
    /// requests/s; with it they pair up, 3.5k.)
    async fn gather(&self) {
        let deadline = tokio::time::Instant::now() + GATHER;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let state = self.state.lock().expect("not poisoned");
                if state.queue.len() + 1 >= state.last_size.max(2) {
                    return;
                }
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return;
            }
        }
    }

    /// Gives a freed lane to the first request still waiting, or frees it.
    fn hand_off(self: &Arc<Self>) {
        let mut state = self.state.lock().expect("not poisoned");
        while let Some(w) = state.queue.pop_front() {
            match w.turn.send(Turn::Lead(Lane(Some(self.clone())), w.member)) {
                Ok(()) => return,
                // Its request is gone; the lane it was offered must not be handed on twice.
                Err(Turn::Lead(mut lane, _)) => lane.0 = None,
                Err(Turn::Done(_)) => unreachable!("a lane was offered"),
            }
        }
        state.busy -= 1;
    }
}

impl Engine {
    /// Whether a request may join a group: small, every transaction planned, and no check of
    /// the schema's deferred to COMMIT (where it would judge a group's members together).
    pub(super) fn groupable(&self, req: &Req<'_>, catalog: &Catalog) -> bool {
        let cfg = &self.inner.cfg;
        cfg.group_commit
            && req.prepared.iter().all(Result::is_ok)
            && req.prepared.iter().flatten().map(Vec::len).sum::<usize>() <= MAX_OPS
            && !catalog.has_deferred_checks()
    }

    /// The fast path through a lane.
    pub(super) async fn grouped(&self, req: &Req<'_>) -> Laned {
        let lanes = &self.inner.lanes;
        if let Some(lane) = lanes.take_free() {
            return self.lead(req, lane, None).await;
        }
        let (member, planned) = self.member(req);
        let (id, mut rx) = match lanes.queue_up(member) {
            Queued::Waiting(id, rx) => (id, rx),
            Queued::Lead(lane, member) => {
                return self.lead(req, lane, Some((*member, planned))).await
            }
        };
        let turn = match tokio::time::timeout(QUEUE_WAIT, &mut rx).await {
            Ok(turn) => turn,
            Err(_) if lanes.leave(id) => return Laned::Alone(None),
            Err(_) => rx.await,
        };
        match turn {
            Ok(Turn::Lead(lane, member)) => {
                self.inner.lanes.gather().await;
                self.lead(req, lane, Some((*member, planned))).await
            }
            Ok(Turn::Done(verdict)) => self.answer_verdict(req, verdict, planned),
            // The leader's task failed; what became of the group is unknown.
            Err(_) => self.answer_verdict(req, Verdict::Lost, planned),
        }
    }

    /// Leads a group of this request and the waiting ones that fit, in a lane.
    async fn lead(&self, req: &Req<'_>, lane: Lane, own: Option<(Member, Planned)>) -> Laned {
        let (member, planned) = own.unwrap_or_else(|| self.member(req));
        let others = self
            .inner
            .lanes
            .take_group(member.lock_key, member.identity.is_some());
        let size = others.len() + 1;
        let mut members = Vec::with_capacity(size);
        members.push(member);
        let mut turns = Vec::with_capacity(others.len());
        for w in others {
            members.push(*w.member);
            turns.push(w.turn);
        }
        let tails = members.iter_mut().map(|m| std::mem::take(&mut m.tail));
        let tails: Vec<Tail> = tails.collect();
        let stmts = self.group_stmts(&members, tails);
        let (verdict, failure) = self.commit_group(&stmts, size).await;
        for turn in turns {
            let _ = turn.send(Turn::Done(verdict));
        }
        drop(lane);
        match (verdict, failure) {
            (Verdict::Undone, Some(f)) if size == 1 && !f.cut_short_by_lane() => {
                Laned::Alone(Some(f))
            }
            _ => self.answer_verdict(req, verdict, planned),
        }
    }

    /// Runs a group's statements in one database transaction.
    async fn commit_group(&self, stmts: &[Stmt<'_>], size: usize) -> (Verdict, Option<Failure>) {
        let m = &self.inner.metrics;
        let client = match self.connection().await {
            Ok(client) => client,
            Err(f) => return (Verdict::Undone, Some(f)),
        };
        match run(
            &client,
            &Head::lane(&self.inner.cfg),
            false,
            stmts,
            Mode::Fast,
        )
        .await
        {
            Ok(()) => {
                if size > 1 {
                    Metrics::add(&m.group_commits_total, 1);
                    Metrics::add(&m.grouped_requests_total, size as u64);
                }
                (Verdict::Committed, None)
            }
            Err(f) if f.commit_maybe_sent && f.db_error().is_none() => (Verdict::Lost, Some(f)),
            Err(f) => {
                if size > 1 {
                    Metrics::add(&m.group_fallbacks_total, 1);
                }
                tracing::debug!(requests = size, cause = %f.summary(), "group undone; applying its requests alone");
                (Verdict::Undone, Some(f))
            }
        }
    }

    /// This request as a group member, and its answers should the group commit.
    fn member(&self, req: &Req<'_>) -> (Member, Planned) {
        let rls = &self.inner.cfg.rls;
        let plan = self.decide(req, HashMap::new());
        let ops = plan.ops().map(|(at, op)| (at, op.clone())).collect();
        let tail = Tail {
            writes: plan.writes,
            ledger: ledger_rows(req, &plan.entries),
        };
        let member = Member {
            caller: (req.ctx.user_id.clone(), req.ctx.claims.clone()),
            identity: identity_sql(rls, req.ctx),
            lock_key: req.scope.map(|s| s.lock_key),
            ops,
            txs: req.txs.len(),
            tail,
        };
        let planned = Planned {
            results: plan.results,
            tally: plan.tally,
        };
        (member, planned)
    }

    /// A group's statements. Each run of members of one caller sets the caller's identity,
    /// takes its members' client locks, and then applies their operations as if they were the
    /// transactions of one request: in order, in as few statements as that allows (one insert
    /// for many single-row requests). Their bookkeeping follows, with one ledger insert for
    /// the run. (Per member, a lock and a ledger insert cost Postgres about a quarter of a
    /// group of eight single-PUT requests.)
    fn group_stmts<'m>(&self, members: &'m [Member], tails: Vec<Tail>) -> Vec<Stmt<'m>> {
        let mut tails = tails.into_iter();
        let mut stmts: Vec<Stmt<'m>> = Vec::new();
        let mut first_tx = 0;
        for run in members.chunk_by(|a, b| a.caller == b.caller) {
            if let Some((sql, params)) = &run[0].identity {
                stmts.push(Stmt {
                    sql: sql.clone(),
                    params: params
                        .iter()
                        .map(|p| Param::Text(Some(p.clone())))
                        .collect(),
                    ops: Vec::new(),
                    expect: Expect::Any,
                });
            }
            let keys: Vec<i64> = run.iter().filter_map(|m| m.lock_key).collect();
            if !keys.is_empty() {
                stmts.push(pipelined_locks(keys));
            }
            // Numbered on from one member to the next, so that no two members' transactions
            // look like one to the planner.
            let mut ops = Vec::new();
            for m in run {
                let at = |r: &OpRef| OpRef {
                    tx: first_tx + r.tx,
                    op: r.op,
                };
                ops.extend(m.ops.iter().map(|(r, op)| (at(r), op)));
                first_tx += m.txs;
            }
            let ops = ops.into_iter();
            stmts.extend(self.as_role(plan::bulk(ops, &self.inner.cfg)));
            let mut ledgers = Vec::new();
            for tail in tails.by_ref().take(run.len()) {
                stmts.extend(tail.writes);
                ledgers.extend(tail.ledger);
            }
            let ledger = ledgers.into_iter().reduce(|mut all, rows| {
                all.append(rows);
                all
            });
            stmts.extend(ledger.map(|rows| rows.into_stmt(&self.inner.tables)));
        }
        stmts
    }

    fn answer_verdict(&self, req: &Req<'_>, verdict: Verdict, planned: Planned) -> Laned {
        match verdict {
            Verdict::Committed => {
                planned.tally.count(&self.inner.metrics);
                Laned::Answered(Ok(planned.results))
            }
            Verdict::Undone => Laned::Alone(None),
            // Only the ledger can tell whether it was committed, and only for transactions with
            // an id under a client id. Alone, the others would be answered "unavailable" too.
            Verdict::Lost if req.scope.is_some() && req.keys.iter().all(Option::is_some) => {
                Laned::Alone(None)
            }
            Verdict::Lost => Laned::Answered(Err(Failure::commit_lost())),
        }
    }
}
