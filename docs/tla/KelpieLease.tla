----------------------------- MODULE KelpieLease -----------------------------
(***************************************************************************)
(* Kelpie lease protocol, as implemented by the lease store and the        *)
(* node-side lease keeper.                                                 *)
(*                                                                         *)
(*  * The store keeps one record per actor: holder, expiry on the store's  *)
(*    clock, fencing token.  It decides acquire / renew / release with a   *)
(*    pure decision function evaluated at the store's current time         *)
(*    (kelpie-registry: protocol.rs, decide).  Renew and release carry the *)
(*    token the node believes it holds and are refused if the record       *)
(*    carries another one (the token guard).                               *)
(*  * Nodes talk to the store with requests that are delayed (or lost) on  *)
(*    the way to the store, and replies that are delayed (or lost) on the  *)
(*    way back.                                                            *)
(*  * Every node has its own local clock that drifts, in both directions,  *)
(*    within a known bound relative to the store's clock.                  *)
(*  * A node believes it holds a lease from the moment a granting reply    *)
(*    arrives until its local clock reaches                                *)
(*        sent_local + LeaseDuration * (Rate - Drift) - Margin             *)
(*    where sent_local is the local time at which it SENT the request      *)
(*    (kelpie-registry: belief.rs, BeliefConfig::belief_duration_ms).      *)
(*  * Nodes crash (losing all local state) and restart.  With             *)
(*    AllowStaleRequests a node may also give up waiting for a request     *)
(*    (a timeout, StoreError::CommitUnknown) that may still be applied.    *)
(*                                                                         *)
(* Representation of time.  The protocol only ever compares a timestamp    *)
(* with the current reading of the same clock, so instead of absolute      *)
(* timestamps the state holds the distance to the current reading:         *)
(*                                                                         *)
(*    store[a].ttl     = expires_at - now      (store clock, >= 0;         *)
(*                                              0 means expired or free)   *)
(*    belief[n][a]     = belief_until - lclock[n]  (node n's local clock,  *)
(*                                              >= 0; 0 means no belief)   *)
(*    msg.age          = lclock[n] - sent_local   (local clock of sender)  *)
(*                                                                         *)
(* and Tick (one tick of the store's clock) moves every node's local clock *)
(* forward by Rate-Drift .. Rate+Drift units, independently per node and   *)
(* per tick.  This is the same protocol as with absolute clocks (it is     *)
(* invariant under shifting time), but it makes the state space finite    *)
(* without bounding time: TLC explores behaviours of                       *)
(* unbounded length, which also keeps the liveness check sound.  The only  *)
(* unbounded quantity left is the fencing token; the state constraint      *)
(* TokenBound bounds it for the safety configurations, and the liveness    *)
(* configuration uses the SaturateTokens abstraction instead (the decision *)
(* function never looks at the token's value).                            *)
(*                                                                         *)
(* The Bug* constants switch on deliberate protocol mutations, and        *)
(* AllowStaleRequests drops assumption A1; they are all FALSE in the safe  *)
(* configuration.  NewTenureOnAcquire is a candidate protocol change (see  *)
(* README.md, "Findings").                                                 *)
(***************************************************************************)
EXTENDS Naturals, FiniteSets

CONSTANTS
    Nodes,          \* node ids
    Actors,         \* actor ids (one lease per actor)
    None,           \* model value: no holder / no message / no history yet
    LeaseDuration,  \* lease length, in store-clock ticks
    Rate,           \* nominal local-clock units per store tick
    Drift,          \* drift bound: local clock advances Rate +/- Drift per tick
    Margin,         \* safety margin subtracted by the lease keeper (local units)
    MaxToken,       \* bound on fencing tokens (constraint, or saturation)
    SaturateTokens, \* liveness abstraction: tokens stop growing at MaxToken
    AllowStaleRequests, \* a node may send while an earlier request of its
                        \* own is still in flight (drops assumption A1)
    NewTenureOnAcquire, \* candidate change: an acquire by the valid holder
                        \* starts a new tenure (token + 1), not idempotent
    \* protocol mutations (must all be FALSE for the real protocol)
    BugAcquireNoCheck,        \* acquire grants without checking the record
    BugBeliefFromReply,       \* belief measured from the reply's arrival
    BugNoDriftMargin,         \* belief not shortened by the drift bound
    BugTokenNotIncreased,     \* takeover of an expired lease keeps the token
    BugRenewNoHolderCheck,    \* renew only checks expiry, not the holder
    BugAcquireRefusesExpired, \* acquire refuses a record held by another
                              \* node even after it expired
    BugIdempotentNoRefresh,   \* idempotent re-acquire leaves the expiry as is
    BugNoTokenGuard           \* renew and release ignore the request's token

ASSUME /\ LeaseDuration \in Nat \ {0}
       /\ Rate \in Nat \ {0}
       /\ Drift \in Nat /\ Drift < Rate
       /\ Margin \in Nat
       /\ MaxToken \in Nat \ {0}
       /\ None \notin Nodes

VARIABLES
    store,      \* store[a]: [holder, ttl, token]
    up,         \* up[n]: node n is running
    belief,     \* belief[n][a]: remaining belief, node-local units
    btoken,     \* btoken[n][a]: token of the believed lease (0: no belief)
    req,        \* req[n]: the node's outstanding request, or None
    orphan,     \* orphan[n]: a request n no longer waits for (sent before a
                \* crash, or given up on), that may still be applied; or None
    rep,        \* rep[n]: a reply travelling to node n, or None
    grants,     \* history: grants[a] = <<previous, latest>> new-holder grants
    lastRenew   \* history: the latest successful renewal applied by the store

vars == <<store, up, belief, btoken, req, orphan, rep, grants, lastRenew>>
nodeVars == <<belief, btoken>>

Max(x, y) == IF x > y THEN x ELSE y
Min(x, y) == IF x < y THEN x ELSE y

ReqTypes == {"acquire", "renew", "release"}

\* Message ages are only needed up to the longest belief any variant computes.
AgeCap == Rate * LeaseDuration

NoGrant == [holder |-> None, token |-> 0]

-----------------------------------------------------------------------------
(* The store's decision function: pure, evaluated at the store's time.     *)

Valid(r) == r.ttl > 0           \* now < expires_at

NextToken(t) == IF SaturateTokens /\ t >= MaxToken THEN t ELSE t + 1

\* granted: the reply is a grant; rec: the record written back;
\* fresh: the grant goes to a new holder (recorded in the grants history).
Reject(r) == [granted |-> FALSE, rec |-> r, fresh |-> FALSE]

\* A grant to a new holder (free or expired record): new expiry, higher token.
NewGrant(r, n) ==
    LET takeover == r.holder # None /\ r.holder # n
        tok      == IF BugTokenNotIncreased /\ takeover
                    THEN r.token ELSE NextToken(r.token)
    IN  [granted |-> TRUE,
         rec     |-> [holder |-> n, ttl |-> LeaseDuration, token |-> tok],
         fresh   |-> TRUE]

DecideAcquire(r, n) ==
    IF BugAcquireNoCheck THEN NewGrant(r, n)
    ELSE IF r.holder = n /\ Valid(r)
         THEN IF NewTenureOnAcquire THEN NewGrant(r, n)
         \* idempotent in holder and token; the expiry is refreshed as by a
         \* renewal, because the node measures its belief from the send time
         \* of THIS request (max(now + LeaseDuration, expires_at) = now + L)
              ELSE [granted |-> TRUE, fresh |-> FALSE,
                    rec |-> IF BugIdempotentNoRefresh THEN r
                            ELSE [r EXCEPT !.ttl = LeaseDuration]]
    ELSE IF r.holder # None /\ r.holder # n
            /\ (Valid(r) \/ BugAcquireRefusesExpired)
         THEN Reject(r)
    ELSE NewGrant(r, n)                         \* free or expired

\* The record names n as holder, with the token the request carries.
HoldsWithToken(r, m, n) ==
    /\ r.holder = n
    /\ BugNoTokenGuard \/ m.token = r.token

DecideRenew(r, m, n) ==
    IF (HoldsWithToken(r, m, n) \/ BugRenewNoHolderCheck) /\ Valid(r)
    THEN [granted |-> TRUE, rec |-> [r EXCEPT !.ttl = LeaseDuration],
          fresh |-> FALSE]
    ELSE Reject(r)

\* The last holder may release even after expiry; the token is kept.
DecideRelease(r, m, n) ==
    IF HoldsWithToken(r, m, n)
    THEN [granted |-> TRUE, rec |-> [r EXCEPT !.holder = None, !.ttl = 0],
          fresh |-> FALSE]
    ELSE Reject(r)

\* Decide request m = [type, token, ...] of node n on record r.
Decide(r, m, n) ==
    CASE m.type = "acquire" -> DecideAcquire(r, n)
      [] m.type = "renew"   -> DecideRenew(r, m, n)
      [] m.type = "release" -> DecideRelease(r, m, n)

-----------------------------------------------------------------------------
(* The lease keeper's belief computation.                                  *)

\* How long (local units) a grant may be believed, counted from the moment
\* the request was sent.  The store's lease runs LeaseDuration ticks from the
\* moment it applies the request, which is no earlier than the send.  A local
\* clock advances at least Rate - Drift units per store tick, so
\* (Rate - Drift) * LeaseDuration local units never outlast the lease.
BeliefDuration ==
    IF BugNoDriftMargin THEN Rate * LeaseDuration - Margin
                        ELSE (Rate - Drift) * LeaseDuration - Margin

\* belief_until - lclock[n] for a granting reply r arriving now, where
\* belief_until = sent_local + BeliefDuration and r.age = lclock[n] - sent_local.
BeliefFromReply(r) ==
    IF BugBeliefFromReply
    THEN Max(0, BeliefDuration)           \* wrong: lclock_at_arrival + duration
    ELSE Max(0, BeliefDuration - r.age)   \* sent_local + duration - lclock

Believes(n, a) == belief[n][a] > 0        \* lclock[n] < belief_until

-----------------------------------------------------------------------------
Init ==
    /\ store = [a \in Actors |-> [holder |-> None, ttl |-> 0, token |-> 0]]
    /\ up = [n \in Nodes |-> TRUE]
    /\ belief = [n \in Nodes |-> [a \in Actors |-> 0]]
    /\ btoken = [n \in Nodes |-> [a \in Actors |-> 0]]
    /\ req = [n \in Nodes |-> None]
    /\ orphan = [n \in Nodes |-> None]
    /\ rep = [n \in Nodes |-> None]
    /\ grants = [a \in Actors |-> <<NoGrant, NoGrant>>]
    /\ lastRenew = None

\* One request at a time per node.  Assumption A1 (unless
\* AllowStaleRequests): a node also waits until a request it gave up on
\* (for instance across a crash) has been applied or dropped.
Idle(n) ==
    /\ up[n]
    /\ req[n] = None
    /\ rep[n] = None
    /\ AllowStaleRequests \/ orphan[n] = None

\* Renew and release carry the token of the believed lease (renew_fenced,
\* release_fenced); acquire carries none.
Send(n, type, a, tok) ==
    req' = [req EXCEPT ![n] =
              [type |-> type, actor |-> a, token |-> tok, age |-> 0]]

SendAcquire(n, a) ==
    /\ Idle(n)
    /\ ~Believes(n, a)
    /\ Send(n, "acquire", a, 0)
    /\ UNCHANGED <<store, up, nodeVars, orphan, rep, grants, lastRenew>>

SendRenew(n, a) ==
    /\ Idle(n)
    /\ Believes(n, a)
    /\ Send(n, "renew", a, btoken[n][a])
    /\ UNCHANGED <<store, up, nodeVars, orphan, rep, grants, lastRenew>>

\* The keeper stops using the lease before it asks the store to release it.
SendRelease(n, a) ==
    /\ Idle(n)
    /\ Believes(n, a)
    /\ Send(n, "release", a, btoken[n][a])
    /\ belief' = [belief EXCEPT ![n][a] = 0]
    /\ btoken' = [btoken EXCEPT ![n][a] = 0]
    /\ UNCHANGED <<store, up, orphan, rep, grants, lastRenew>>

\* The store applies request m of node n atomically at its current time.
StoreApply(n, m) ==
    LET a == m.actor
        r == store[a]
        d == Decide(r, m, n)
    IN  /\ store' = [store EXCEPT ![a] = d.rec]
        /\ grants' = IF d.fresh
                     THEN [grants EXCEPT ![a] =
                             <<grants[a][2],
                               [holder |-> n, token |-> d.rec.token]>>]
                     ELSE grants
        /\ lastRenew' = IF m.type = "renew" /\ d.granted
                        THEN [by |-> n, actor |-> a,
                              holder |-> r.holder, valid |-> Valid(r),
                              sameTenure |-> m.token = r.token]
                        ELSE lastRenew

\* Apply the node's live request; the reply starts travelling back, carrying
\* the granted token and the request's send time (as its age on the
\* sender's clock).
Apply(n) ==
    /\ req[n] # None
    /\ LET m == req[n]
           d == Decide(store[m.actor], m, n)
       IN  /\ StoreApply(n, m)
           /\ rep' = [rep EXCEPT ![n] =
                        [type |-> m.type, actor |-> m.actor,
                         granted |-> d.granted,
                         token |-> IF d.granted /\ m.type # "release"
                                   THEN d.rec.token ELSE 0,
                         age |-> m.age]]
    /\ req' = [req EXCEPT ![n] = None]
    /\ UNCHANGED <<up, nodeVars, orphan>>

\* A request the node no longer waits for still reaches the store; its reply
\* has nowhere to go.
ApplyOrphan(n) ==
    /\ orphan[n] # None
    /\ StoreApply(n, orphan[n])
    /\ orphan' = [orphan EXCEPT ![n] = None]
    /\ UNCHANGED <<up, nodeVars, req, rep>>

LoseRequest(n) ==
    /\ req[n] # None
    /\ req' = [req EXCEPT ![n] = None]
    /\ UNCHANGED <<store, up, nodeVars, orphan, rep, grants, lastRenew>>

LoseOrphan(n) ==
    /\ orphan[n] # None
    /\ orphan' = [orphan EXCEPT ![n] = None]
    /\ UNCHANGED <<store, up, nodeVars, req, rep, grants, lastRenew>>

LoseReply(n) ==
    /\ rep[n] # None
    /\ rep' = [rep EXCEPT ![n] = None]
    /\ UNCHANGED <<store, up, nodeVars, req, orphan, grants, lastRenew>>

\* Only without A1: the node gives up waiting for its request (a timeout, or
\* an unknown commit outcome), although the store may still apply it.
Abandon(n) ==
    /\ AllowStaleRequests
    /\ up[n]
    /\ req[n] # None
    /\ orphan[n] = None
    /\ orphan' = [orphan EXCEPT ![n] =
                    [type |-> req[n].type, actor |-> req[n].actor,
                     token |-> req[n].token]]
    /\ req' = [req EXCEPT ![n] = None]
    /\ UNCHANGED <<store, up, nodeVars, rep, grants, lastRenew>>

\* The reply arrives.  A grant (re)sets the belief, computed from the send
\* time, and records its token; a refused acquire or renew clears the
\* belief.
Receive(n) ==
    /\ up[n]
    /\ rep[n] # None
    /\ LET r == rep[n]
           b == IF r.granted THEN BeliefFromReply(r) ELSE 0
       IN  IF r.type = "release"
           THEN UNCHANGED nodeVars
           ELSE /\ belief' = [belief EXCEPT ![n][r.actor] = b]
                /\ btoken' = [btoken EXCEPT ![n][r.actor] =
                                IF b > 0 THEN r.token ELSE 0]
    /\ rep' = [rep EXCEPT ![n] = None]
    /\ UNCHANGED <<store, up, req, orphan, grants, lastRenew>>

\* A crash loses the node's beliefs and its connection: the pending reply is
\* gone, but a pending request may still reach the store (it becomes an
\* orphan).  Model bound: at most one orphan per node.
Crash(n) ==
    /\ up[n]
    /\ req[n] = None \/ orphan[n] = None
    /\ up' = [up EXCEPT ![n] = FALSE]
    /\ belief' = [belief EXCEPT ![n] = [a \in Actors |-> 0]]
    /\ btoken' = [btoken EXCEPT ![n] = [a \in Actors |-> 0]]
    /\ rep' = [rep EXCEPT ![n] = None]
    /\ req' = [req EXCEPT ![n] = None]
    /\ orphan' = IF req[n] # None
                 THEN [orphan EXCEPT ![n] =
                         [type |-> req[n].type, actor |-> req[n].actor,
                          token |-> req[n].token]]
                 ELSE orphan
    /\ UNCHANGED <<store, grants, lastRenew>>

Restart(n) ==
    /\ ~up[n]
    /\ up' = [up EXCEPT ![n] = TRUE]
    /\ UNCHANGED <<store, nodeVars, req, orphan, rep, grants, lastRenew>>

\* One tick of the store's clock.  Each node's local clock advances by some
\* amount in Rate-Drift .. Rate+Drift (slow and fast clocks).
Tick ==
    \E d \in [Nodes -> (Rate - Drift)..(Rate + Drift)] :
        /\ store' = [a \in Actors |-> [store[a] EXCEPT !.ttl = Max(0, @ - 1)]]
        /\ belief' = [n \in Nodes |->
                        [a \in Actors |-> Max(0, belief[n][a] - d[n])]]
        \* the keeper forgets a lease whose belief ran out
        /\ btoken' = [n \in Nodes |->
                        [a \in Actors |->
                           IF belief[n][a] > d[n] THEN btoken[n][a] ELSE 0]]
        /\ req' = [n \in Nodes |->
                     IF req[n] = None THEN None
                     ELSE [req[n] EXCEPT !.age = Min(AgeCap, @ + d[n])]]
        /\ rep' = [n \in Nodes |->
                     IF rep[n] = None THEN None
                     ELSE [rep[n] EXCEPT !.age = Min(AgeCap, @ + d[n])]]
        /\ UNCHANGED <<up, orphan, grants, lastRenew>>

Next ==
    \/ Tick
    \/ \E n \in Nodes :
        \/ \E a \in Actors : SendAcquire(n, a) \/ SendRenew(n, a)
                             \/ SendRelease(n, a)
        \/ Apply(n) \/ ApplyOrphan(n)
        \/ LoseRequest(n) \/ LoseOrphan(n) \/ LoseReply(n)
        \/ Receive(n) \/ Abandon(n)
        \/ Crash(n) \/ Restart(n)

Spec == Init /\ [][Next]_vars

-----------------------------------------------------------------------------
(* Fairness for the liveness check: time passes; a live idle node that does *)
(* not hold the lease keeps asking for it; a request that is retried       *)
(* forever is eventually applied (strong fairness: the network may drop    *)
(* any finite number of attempts); replies and pre-crash requests are       *)
(* eventually delivered or dropped.  Crash and Restart get no fairness: a  *)
(* crashed node may stay down for ever.                                    *)

BaseFairness ==
    /\ WF_vars(Tick)
    /\ \A n \in Nodes :
        /\ \A a \in Actors : WF_vars(SendAcquire(n, a))
        /\ WF_vars(ApplyOrphan(n) \/ LoseOrphan(n))
        /\ WF_vars(Receive(n) \/ LoseReply(n))

LiveSpec == Spec /\ BaseFairness /\ \A n \in Nodes : SF_vars(Apply(n))

\* Wrong assumption, for the negative liveness check: only weak fairness on
\* applying requests, so the network may drop every retry.
WeakLiveSpec == Spec /\ BaseFairness /\ \A n \in Nodes : WF_vars(Apply(n))

-----------------------------------------------------------------------------
(* Properties                                                              *)

TypeOK ==
    /\ \A a \in Actors :
         /\ store[a].holder \in Nodes \cup {None}
         /\ store[a].ttl \in 0..LeaseDuration
         /\ store[a].token \in Nat
         /\ store[a].holder = None => store[a].ttl = 0
    /\ up \in [Nodes -> BOOLEAN]
    /\ \A n \in Nodes, a \in Actors :
         /\ belief[n][a] \in 0..AgeCap
         /\ btoken[n][a] \in Nat
         /\ (belief[n][a] = 0) <=> (btoken[n][a] = 0)
    /\ \A n \in Nodes :
         /\ req[n] = None \/ (req[n].type \in ReqTypes /\ req[n].actor \in Actors
                             /\ req[n].token \in Nat
                             /\ req[n].age \in 0..AgeCap)
         /\ rep[n] = None \/ (rep[n].type \in ReqTypes /\ rep[n].actor \in Actors
                             /\ rep[n].granted \in BOOLEAN
                             /\ rep[n].age \in 0..AgeCap)
         /\ ~up[n] => (req[n] = None /\ rep[n] = None
                       /\ \A a \in Actors : belief[n][a] = 0)
         /\ ~AllowStaleRequests => (req[n] = None \/ orphan[n] = None)

\* At most one node believes it holds the lease of an actor.
LeaseUniqueness ==
    \A a \in Actors : \A n, m \in Nodes :
        (Believes(n, a) /\ Believes(m, a)) => n = m

\* A node's belief implies the store's record names it as holder of an
\* unexpired lease (so the belief ends no later than the store's expiry).
BeliefConsistency ==
    \A n \in Nodes, a \in Actors :
        Believes(n, a) => (store[a].holder = n /\ Valid(store[a]))

\* Every renewal the store granted was requested by the holder of an
\* unexpired lease, for its current tenure (history variable lastRenew,
\* recorded when the store applied the renewal).
RenewalRequiresOwnership ==
    lastRenew = None
    \/ /\ lastRenew.holder = lastRenew.by
       /\ lastRenew.valid
       /\ lastRenew.sameTenure

\* A free or expired lease can be claimed: an acquire by any node, applied
\* now, would be granted.
ExpiredLeaseClaimable ==
    \A a \in Actors, n \in Nodes :
        ~Valid(store[a]) =>
            Decide(store[a], [type |-> "acquire", token |-> 0], n).granted

\* Over the history of grants to a new holder: the token never decreases,
\* successive distinct holders get strictly increasing tokens, and the
\* store's token is never below the last one it issued.
FencingTokenMonotonic ==
    \A a \in Actors :
        LET prev == grants[a][1]
            last == grants[a][2]
        IN  /\ prev.token <= last.token
            /\ prev.holder # last.holder => prev.token < last.token
            /\ last.token <= store[a].token

\* Liveness.  If crashes eventually stop and some node stays up, then every
\* actor's lease is, again and again, held in the store by a live node:
\* leases of dead nodes expire and are taken over, lost messages are retried.
LeaseHeldByLiveNode(a) ==
    /\ store[a].holder # None
    /\ up[store[a].holder]
    /\ Valid(store[a])

EventualLeaseResolution ==
    (<>[][\A n \in Nodes : ~Crash(n)]_vars /\ <>[](\E n \in Nodes : up[n]))
        => \A a \in Actors : []<>LeaseHeldByLiveNode(a)

\* State constraint for the safety configurations.
TokenBound == \A a \in Actors : store[a].token <= MaxToken

=============================================================================
