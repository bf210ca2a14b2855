----------------------------- MODULE KelpieLease -----------------------------
(***************************************************************************)
(* Kelpie lease protocol, as implemented by the lease store and the        *)
(* node-side lease keeper (crates/kelpie-lease/src).                       *)
(*                                                                         *)
(*  * The store keeps one record per actor: holder, expiry on the store's  *)
(*    clock, fencing token.  It decides acquire / renew / release with a   *)
(*    pure decision function evaluated at the store's current time         *)
(*    (protocol.rs, decide).  Renew and release carry the token the node   *)
(*    believes it holds and are refused if the record carries another one  *)
(*    (the token guard).                                                   *)
(*  * The holder a request names is the identity of one process lifetime:  *)
(*    <<node, incarnation>> (with Incarnations; the keeper sends           *)
(*    node_id@incarnation).  A restarted process is a new holder.          *)
(*  * Nodes talk to the store with requests that are delayed (or lost) on  *)
(*    the way to the store, and replies that are delayed (or lost) on the  *)
(*    way back.  With AllowStaleRequests a node may stop waiting for a     *)
(*    request that the store may still apply (a timeout,                   *)
(*    StoreError::CommitUnknown, a renewal abandoned when its belief ran   *)
(*    out), the network may deliver a request more than once, and requests *)
(*    of a crashed process still arrive after it restarted.                *)
(*  * Every node has its own local clock that drifts, in both directions,  *)
(*    within a known bound relative to the store's clock.                  *)
(*  * A node believes it holds a lease from the moment a granting reply    *)
(*    arrives until its local clock reaches                                *)
(*            sent_local + LeaseDuration * (Rate - Drift) - Margin         *)
(*    where sent_local is the local time at which it SENT the request      *)
(*    (belief.rs, BeliefConfig::belief_duration_ms).  A later grant with   *)
(*    the same token never shortens the belief (Belief::on_granted).       *)
(*  * The keeper (keeper/core.rs, KeeperCore) sends the owner's calls      *)
(*    (acquire, release) and its loop's renewals and release retries.  It  *)
(*    sends no acquire for an actor while a release of that actor is       *)
(*    unresolved (ReleaseGuard), retries a release until the store         *)
(*    answers, does not believe a grant whose acquire was overtaken by a   *)
(*    release (AcquireTicket), and drops a lease whose belief ran out.     *)
(*  * Nodes crash (losing all local state) and restart.                    *)
(*                                                                         *)
(* Representation of time.  The protocol only ever compares a timestamp    *)
(* with the current reading of the same clock, so instead of absolute      *)
(* timestamps the state holds the distance to the current reading:         *)
(*                                                                         *)
(*       store[a].ttl   = expires_at - now          (store clock, >= 0;    *)
(*                                                   0: expired or free)   *)
(*       belief[n][a]   = belief_until - lclock[n]  (node n's local clock, *)
(*                                                   >= 0; 0: no belief)   *)
(*       msg.age        = lclock[n] - sent_local    (sender's local clock) *)
(*                                                                         *)
(* and Tick (one tick of the store's clock) moves every node's local clock *)
(* forward by Rate-Drift .. Rate+Drift units, independently per node and   *)
(* per tick.  This is the same protocol as with absolute clocks (it is     *)
(* invariant under shifting time), but it makes the state space finite     *)
(* without bounding time: TLC explores behaviours of unbounded length,     *)
(* which also keeps the liveness check sound.  The unbounded quantities    *)
(* left are the fencing token and the incarnation: the state constraint    *)
(* TokenBound bounds tokens in the safety configurations (the liveness     *)
(* configuration uses the SaturateTokens abstraction instead), and a node  *)
(* restarts at most MaxIncarnation - 1 times (after that a crashed node    *)
(* stays down).                                                            *)
(*                                                                         *)
(* The Bug* constants switch on deliberate protocol mutations; they are    *)
(* all FALSE in the safe configuration.  AllowStaleRequests = FALSE is     *)
(* assumption A1 (README.md); Incarnations = FALSE lets a restarted        *)
(* process keep its holder id; ReleaseGuard = FALSE and AcquireTicket =    *)
(* FALSE remove the keeper's guards; OwnerOverlap lets another task of the *)
(* node release while the owner's acquire is in flight; LoopSlot lets      *)
(* renewals overlap the owner's calls.  NewTenureOnAcquire is an           *)
(* alternative protocol change (README.md, "Findings").                    *)
(***************************************************************************)
EXTENDS Naturals, FiniteSets, TLC

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
    Incarnations,   \* a restarted process is a new holder <<node, inc + 1>>
    MaxIncarnation, \* model bound: incarnations 1..MaxIncarnation per node
    MaxOrphans,     \* model bound: requests in flight that nobody waits for
    ReleaseGuard,   \* the keeper sends no acquire for an actor while a
                    \* release of that actor is unresolved
    OwnerOverlap,   \* the owner may call release while its own acquire of
                    \* the same actor is in flight (concurrent callers)
    AcquireTicket,  \* the keeper does not believe a grant whose acquire was
                    \* in flight when a release of the actor began
    LoopSlot,       \* renewals travel concurrently with the owner's calls
                    \* (FALSE: model bound, they take turns)
    NewTenureOnAcquire, \* alternative change: an acquire by the valid holder
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
       /\ MaxIncarnation \in Nat \ {0}
       /\ MaxOrphans \in Nat
       /\ None \notin Nodes
       /\ \A flag \in {SaturateTokens, AllowStaleRequests, Incarnations,
                       ReleaseGuard, OwnerOverlap, AcquireTicket, LoopSlot,
                       NewTenureOnAcquire,
                       BugAcquireNoCheck, BugBeliefFromReply,
                       BugNoDriftMargin, BugTokenNotIncreased,
                       BugRenewNoHolderCheck, BugAcquireRefusesExpired,
                       BugIdempotentNoRefresh, BugNoTokenGuard} :
            flag \in BOOLEAN

VARIABLES
    store,      \* store[a]: [holder, ttl, token]
    up,         \* up[n]: node n's process is running
    inc,        \* inc[n]: incarnation of node n's current (or last) process
    belief,     \* belief[n][a]: remaining belief, node-local units
    btoken,     \* btoken[n][a]: token of the believed lease (0: no belief)
    releasing,  \* releasing[n][a]: token of an unresolved release (0: none)
    req,        \* req[n][s]: the request slot s of node n waits for, or None
    rep,        \* rep[n][s]: a reply travelling to slot s of node n, or None
    orphans,    \* requests on their way that nobody waits for (given up on,
                \* sent by a crashed process, or duplicated by the network)
    badToken,   \* history: the first write that broke token monotonicity
    badRenew    \* history: the first renewal granted to a non-holder

vars == <<store, up, inc, belief, btoken, releasing, req, rep, orphans,
          badToken, badRenew>>
nodeVars == <<belief, btoken, releasing>>
netVars == <<req, rep, orphans>>
histVars == <<badToken, badRenew>>

Max(x, y) == IF x > y THEN x ELSE y
Min(x, y) == IF x < y THEN x ELSE y

ReqTypes == {"acquire", "renew", "release"}

\* Where a node's requests wait for their replies, one at a time per slot:
\*  * "owner": the owner's calls (acquire, release) and the renewal loop's
\*    retries of an unresolved release (the owner cannot acquire meanwhile,
\*    and the first answer resolves the release, so retries and the
\*    owner's own attempt need not overlap);
\*  * "loop": renewals, with LoopSlot; otherwise renewals take turns with
\*    the owner's calls in the "owner" slot (a model bound).  With
\*    OwnerOverlap a release sent while the owner's acquire is in flight
\*    also goes here.
Slots == {"owner", "loop"}
RenewSlot == IF LoopSlot THEN "loop" ELSE "owner"

\* Holder identities.  Without Incarnations every process of a node uses
\* incarnation 1, i.e. the node id alone.
Incs == 1..MaxIncarnation
Holders == Nodes \X Incs
Id(n) == <<n, inc[n]>>

-----------------------------------------------------------------------------
(* The store's decision function: pure, evaluated at the store's time.     *)
(* h is the holder id the request names.                                   *)

Valid(r) == r.ttl > 0           \* now < expires_at

NextToken(t) == IF SaturateTokens /\ t >= MaxToken THEN t ELSE t + 1

\* granted: the reply is a grant (and the record is written back); rec: the
\* record after the decision.
Reject(r) == [granted |-> FALSE, rec |-> r]

\* A grant to a new holder (free or expired record): new expiry, higher token.
NewGrant(r, h) ==
    LET takeover == r.holder # None /\ r.holder # h
        tok      == IF BugTokenNotIncreased /\ takeover
                    THEN r.token ELSE NextToken(r.token)
    IN  [granted |-> TRUE,
         rec     |-> [holder |-> h, ttl |-> LeaseDuration, token |-> tok]]

DecideAcquire(r, h) ==
    IF BugAcquireNoCheck THEN NewGrant(r, h)
    ELSE IF r.holder = h /\ Valid(r)
         THEN IF NewTenureOnAcquire THEN NewGrant(r, h)
         \* idempotent in holder and token; the expiry is refreshed as by a
         \* renewal, because the node measures its belief from the send time
         \* of THIS request (max(now + LeaseDuration, expires_at) = now + L)
              ELSE [granted |-> TRUE,
                    rec |-> IF BugIdempotentNoRefresh THEN r
                            ELSE [r EXCEPT !.ttl = LeaseDuration]]
    ELSE IF r.holder # None /\ r.holder # h
            /\ (Valid(r) \/ BugAcquireRefusesExpired)
         THEN Reject(r)
    ELSE NewGrant(r, h)                         \* free or expired

\* The record names h as holder, with the token the request carries.
HoldsWithToken(r, m, h) ==
    /\ r.holder = h
    /\ BugNoTokenGuard \/ m.token = r.token

DecideRenew(r, m, h) ==
    IF (HoldsWithToken(r, m, h) \/ BugRenewNoHolderCheck) /\ Valid(r)
    THEN [granted |-> TRUE, rec |-> [r EXCEPT !.ttl = LeaseDuration]]
    ELSE Reject(r)

\* The last holder may release even after expiry; the token is kept.
DecideRelease(r, m, h) ==
    IF HoldsWithToken(r, m, h)
    THEN [granted |-> TRUE, rec |-> [r EXCEPT !.holder = None, !.ttl = 0]]
    ELSE Reject(r)

\* Decide request m = [type, token, ...] of holder h on record r.
Decide(r, m, h) ==
    CASE m.type = "acquire" -> DecideAcquire(r, h)
      [] m.type = "renew"   -> DecideRenew(r, m, h)
      [] m.type = "release" -> DecideRelease(r, m, h)

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

\* Message ages only matter up to the belief duration: a grant whose
\* request is that old supports no belief.
AgeCap == Max(BeliefDuration, 0)

\* belief_until - lclock[n] for a granting reply r arriving now, where
\* belief_until = sent_local + BeliefDuration and r.age = lclock[n] - sent_local.
BeliefFromReply(r) ==
    IF BugBeliefFromReply
    THEN AgeCap                           \* wrong: lclock_at_arrival + duration
    ELSE Max(0, BeliefDuration - r.age)   \* sent_local + duration - lclock

Believes(n, a) == belief[n][a] > 0        \* lclock[n] < belief_until

-----------------------------------------------------------------------------
Init ==
    /\ store = [a \in Actors |-> [holder |-> None, ttl |-> 0, token |-> 0]]
    /\ up = [n \in Nodes |-> TRUE]
    /\ inc = [n \in Nodes |-> 1]
    /\ belief = [n \in Nodes |-> [a \in Actors |-> 0]]
    /\ btoken = [n \in Nodes |-> [a \in Actors |-> 0]]
    /\ releasing = [n \in Nodes |-> [a \in Actors |-> 0]]
    /\ req = [n \in Nodes |-> [s \in Slots |-> None]]
    /\ rep = [n \in Nodes |-> [s \in Slots |-> None]]
    /\ orphans = {}
    /\ badToken = None
    /\ badRenew = None

SlotFree(n, s) == req[n][s] = None /\ rep[n][s] = None

\* Assumption A1 (only without AllowStaleRequests): a node sends nothing
\* while another request of its own is in flight, including one it gave up
\* on (for instance across a crash), until that one has been applied or
\* dropped.
A1(n) ==
    AllowStaleRequests
    \/ /\ \A s \in Slots : SlotFree(n, s)
       /\ \A o \in orphans : o.holder[1] # n

CanSend(n, s) == up[n] /\ SlotFree(n, s) /\ A1(n)

\* A request that nobody waits for any more, as it travels on.
AsOrphan(n, m) ==
    [type |-> m.type, actor |-> m.actor, token |-> m.token, holder |-> Id(n)]

\* An orphan that can no longer change the store, given store records st: a
\* renew or release whose token is below the record's is refused by the
\* token guard (tokens never decrease), so it is as good as lost.  Dropping
\* it keeps the state space small and only leaves room for other orphans.
\* (Not under the mutations that make the store ignore the token.)
Dead(o, st) ==
    /\ o.type # "acquire"
    /\ o.token < st[o.actor].token
    /\ ~BugNoTokenGuard
    /\ o.type = "renew" => ~BugRenewNoHolderCheck

Prune(os, st) == {o \in os : ~Dead(o, st)}

\* The orphans after adding new ones (model bound: MaxOrphans).
WithOrphans(new, st) ==
    /\ orphans' = Prune(orphans \cup new, st)
    /\ Cardinality(orphans') <= MaxOrphans

\* Renew and release carry the token of the held lease (renew_fenced,
\* release_fenced); acquire carries none.  The age of a release is not
\* needed (its reply sets no belief) and stays 0.  An acquire is marked
\* overtaken if a release of its actor begins while it is in flight (the
\* keeper's AcquireTicket).
Send(n, s, type, a, tok) ==
    req' = [req EXCEPT ![n][s] =
              [type |-> type, actor |-> a, token |-> tok, age |-> 0,
               overtaken |-> FALSE]]

\* The owner's acquire (LeaseKeeper::acquire): refused by the keeper itself
\* while a release of the actor is unresolved.  Allowed while the keeper
\* already holds the lease (idempotent), and to retry an acquire whose
\* outcome is unknown.
SendAcquire(n, a) ==
    /\ CanSend(n, "owner")
    /\ ReleaseGuard => releasing[n][a] = 0
    /\ Send(n, "owner", "acquire", a, 0)
    /\ UNCHANGED <<store, up, inc, nodeVars, rep, orphans, histVars>>

\* The renewal loop renews a lease it believes it holds.
SendRenew(n, a) ==
    /\ CanSend(n, RenewSlot)
    /\ Believes(n, a)
    /\ Send(n, RenewSlot, "renew", a, btoken[n][a])
    /\ UNCHANGED <<store, up, inc, nodeVars, rep, orphans, histVars>>

\* The owner's acquire in flight (request or reply), if any.
Acquiring(m) == m # None /\ m.type = "acquire"
OwnerAcquiring(n) ==
    Acquiring(req[n]["owner"]) \/ Acquiring(rep[n]["owner"])

\* Marks the owner's acquire in flight, if any, as overtaken by a release.
Overtaken(m) == IF Acquiring(m) THEN [m EXCEPT !.overtaken = TRUE] ELSE m

\* The owner's release (LeaseKeeper::release) of a lease the keeper holds:
\* the keeper drops the lease before it sends the release, and records the
\* release as unresolved.  A single caller waits for its acquire before it
\* releases; with OwnerOverlap another task of the node releases while an
\* acquire is in flight (the release then takes the other slot), and that
\* acquire is marked overtaken.
SendRelease(n, a) ==
    /\ up[n] /\ A1(n)
    /\ Believes(n, a)
    /\ \/ /\ SlotFree(n, "owner")
          /\ Send(n, "owner", "release", a, btoken[n][a])
          /\ UNCHANGED rep
       \/ /\ OwnerOverlap /\ OwnerAcquiring(n) /\ SlotFree(n, "loop")
          /\ req' = [req EXCEPT
                       ![n]["owner"] = Overtaken(@),
                       ![n]["loop"] = [type |-> "release", actor |-> a,
                                       token |-> btoken[n][a], age |-> 0,
                                       overtaken |-> FALSE]]
          /\ rep' = [rep EXCEPT ![n]["owner"] = Overtaken(@)]
    /\ belief' = [belief EXCEPT ![n][a] = 0]
    /\ btoken' = [btoken EXCEPT ![n][a] = 0]
    /\ releasing' = [releasing EXCEPT ![n][a] = btoken[n][a]]
    /\ UNCHANGED <<store, up, inc, orphans, histVars>>

\* The renewal loop retries an unresolved release, with its token.
RetryRelease(n, a) ==
    /\ CanSend(n, "owner")
    /\ releasing[n][a] # 0
    /\ Send(n, "owner", "release", a, releasing[n][a])
    /\ UNCHANGED <<store, up, inc, nodeVars, rep, orphans, histVars>>

\* The store applies request m naming holder h atomically at its current
\* time.
StoreApply(h, m) ==
    LET a == m.actor
        r == store[a]
        d == Decide(r, m, h)
    IN  /\ store' = [store EXCEPT ![a] = d.rec]
        /\ LET validHolder == IF Valid(r) THEN r.holder ELSE None
               newHolder   == d.rec.holder # None /\ d.rec.holder # validHolder
           IN  badToken' =
                 IF /\ badToken = None /\ d.granted
                    /\ \/ d.rec.token < r.token
                       \/ newHolder /\ d.rec.token <= r.token
                 THEN [by |-> h, actor |-> a, type |-> m.type, before |-> r,
                       after |-> d.rec]
                 ELSE badToken
        /\ badRenew' =
              IF /\ m.type = "renew" /\ d.granted /\ badRenew = None
                 /\ ~(r.holder = h /\ Valid(r) /\ m.token = r.token)
              THEN [by |-> h, actor |-> a, token |-> m.token, record |-> r]
              ELSE badRenew

\* The reply to request m, decided as d:
\*  * a granted acquire carries the granted token, and the request's send
\*    time as its age on the sender's clock;
\*  * a refused acquire changes nothing at the keeper (it only returns the
\*    refusal to the owner), so it is modelled as no reply;
\*  * a renewal's reply carries the request's token, and its age if granted;
\*  * any answer to a release resolves it; only its token matters.
Reply(m, d) ==
    CASE m.type = "acquire" ->
           IF d.granted
           THEN [type |-> "acquire", actor |-> m.actor, granted |-> TRUE,
                 token |-> d.rec.token, age |-> m.age,
                 overtaken |-> m.overtaken]
           ELSE None
      [] m.type = "renew" ->
           [type |-> "renew", actor |-> m.actor, granted |-> d.granted,
            token |-> m.token, age |-> IF d.granted THEN m.age ELSE 0]
      [] m.type = "release" ->
           [type |-> "release", actor |-> m.actor, token |-> m.token]

\* Apply the request slot s of node n waits for; the reply starts travelling
\* back.  Without A1 the network may also deliver a copy of the request
\* later.
Apply(n, s) ==
    /\ req[n][s] # None
    /\ LET m == req[n][s]
           d == Decide(store[m.actor], m, Id(n))
       IN  /\ StoreApply(Id(n), m)
           /\ rep' = [rep EXCEPT ![n][s] = Reply(m, d)]
           /\ \/ WithOrphans({}, store')
              \/ AllowStaleRequests /\ WithOrphans({AsOrphan(n, m)}, store')
    /\ req' = [req EXCEPT ![n][s] = None]
    /\ UNCHANGED <<up, inc, nodeVars>>

\* A request nobody waits for reaches the store; its reply goes nowhere.
\* Without A1 another copy of it may still be on its way.
ApplyOrphan(o) ==
    /\ o \in orphans
    /\ StoreApply(o.holder, o)
    /\ \/ orphans' = Prune(orphans \ {o}, store')
       \/ AllowStaleRequests /\ orphans' = Prune(orphans, store')
    /\ UNCHANGED <<up, inc, nodeVars, req, rep>>

\* Message loss.  A lost request or reply makes the call fail (the node may
\* retry); with AllowStaleRequests, Abandon covers the case where the node
\* stops waiting although the request may still be applied.
LoseRequest(n, s) ==
    /\ req[n][s] # None
    /\ req' = [req EXCEPT ![n][s] = None]
    /\ UNCHANGED <<store, up, inc, nodeVars, rep, orphans, histVars>>

LoseOrphan(o) ==
    /\ o \in orphans
    /\ orphans' = orphans \ {o}
    /\ UNCHANGED <<store, up, inc, nodeVars, req, rep, histVars>>

LoseReply(n, s) ==
    /\ rep[n][s] # None
    /\ rep' = [rep EXCEPT ![n][s] = None]
    /\ UNCHANGED <<store, up, inc, nodeVars, req, orphans, histVars>>

\* Only without A1: the node stops waiting for a request (a timeout, an
\* unknown commit outcome, a renewal abandoned when the belief ran out),
\* although the store may still apply it.
Abandon(n, s) ==
    /\ AllowStaleRequests
    /\ up[n]
    /\ req[n][s] # None
    /\ WithOrphans({AsOrphan(n, req[n][s])}, store)
    /\ req' = [req EXCEPT ![n][s] = None]
    /\ UNCHANGED <<store, up, inc, nodeVars, rep, histVars>>

\* A reply arrives (keeper/core.rs: acquire_replied, renew_replied,
\* release_replied):
\*  * a granted acquire: the keeper believes from the send time, with the
\*    granted token; for the token it already believes, never shorter
\*    (Belief::on_granted); a grant for another token replaces the belief.
\*    With AcquireTicket, a grant whose acquire was overtaken by a release
\*    of the actor is not believed (KeeperCore::acquire_replied);
\*  * a renewal's reply counts only if the keeper still believes the token
\*    it renewed: a grant extends the belief (never shortens it), a refusal
\*    drops the lease;
\*  * any answer to a release (granted or refused) resolves it.
Receive(n, s) ==
    /\ up[n]
    /\ rep[n][s] # None
    /\ LET r == rep[n][s]
           a == r.actor
           same == btoken[n][a] = r.token
       IN  CASE r.type = "acquire" /\ r.overtaken /\ AcquireTicket ->
                  UNCHANGED <<belief, btoken, releasing>>
             [] r.type = "acquire" ->
                  /\ IF same
                     THEN /\ belief' = [belief EXCEPT ![n][a] =
                                          Max(@, BeliefFromReply(r))]
                          /\ UNCHANGED btoken
                     ELSE /\ belief' = [belief EXCEPT ![n][a] =
                                          BeliefFromReply(r)]
                          /\ btoken' = [btoken EXCEPT ![n][a] =
                                IF BeliefFromReply(r) > 0 THEN r.token ELSE 0]
                  /\ UNCHANGED releasing
             [] r.type = "renew" ->
                  /\ IF ~same THEN UNCHANGED <<belief, btoken>>
                     ELSE IF r.granted
                     THEN /\ belief' = [belief EXCEPT ![n][a] =
                                          Max(@, BeliefFromReply(r))]
                          /\ UNCHANGED btoken
                     ELSE /\ belief' = [belief EXCEPT ![n][a] = 0]
                          /\ btoken' = [btoken EXCEPT ![n][a] = 0]
                  /\ UNCHANGED releasing
             [] r.type = "release" ->
                  /\ releasing' = IF releasing[n][a] = r.token
                                  THEN [releasing EXCEPT ![n][a] = 0]
                                  ELSE releasing
                  /\ UNCHANGED <<belief, btoken>>
    /\ rep' = [rep EXCEPT ![n][s] = None]
    /\ UNCHANGED <<store, up, inc, req, orphans, histVars>>

\* A crash loses the process's memory (beliefs, held leases, unresolved
\* releases) and its connections: replies in flight are gone, and each
\* request in flight is either lost or still reaches the store later, as
\* an orphan naming the crashed process's holder id.
Crash(n) ==
    /\ up[n]
    /\ \E keep \in SUBSET {AsOrphan(n, req[n][s]) :
                             s \in {s \in Slots : req[n][s] # None}} :
         WithOrphans(keep, store)
    /\ up' = [up EXCEPT ![n] = FALSE]
    /\ belief' = [belief EXCEPT ![n] = [a \in Actors |-> 0]]
    /\ btoken' = [btoken EXCEPT ![n] = [a \in Actors |-> 0]]
    /\ releasing' = [releasing EXCEPT ![n] = [a \in Actors |-> 0]]
    /\ req' = [req EXCEPT ![n] = [s \in Slots |-> None]]
    /\ rep' = [rep EXCEPT ![n] = [s \in Slots |-> None]]
    /\ UNCHANGED <<store, inc, histVars>>

\* A new process starts with empty memory.  With Incarnations it is a new
\* holder; model bound: at most MaxIncarnation processes per node.
Restart(n) ==
    /\ ~up[n]
    /\ Incarnations => inc[n] < MaxIncarnation
    /\ up' = [up EXCEPT ![n] = TRUE]
    /\ inc' = IF Incarnations THEN [inc EXCEPT ![n] = @ + 1] ELSE inc
    /\ UNCHANGED <<store, nodeVars, netVars, histVars>>

\* Ages matter only for acquires and renewals, and for their granted replies.
AgedReq(m, d) ==
    IF m = None \/ m.type = "release" THEN m
    ELSE [m EXCEPT !.age = Min(AgeCap, @ + d)]
AgedRep(m, d) ==
    IF m = None \/ m.type = "release" THEN m
    ELSE IF ~m.granted THEN m
    ELSE [m EXCEPT !.age = Min(AgeCap, @ + d)]

\* Node n has something the length of a tick on its clock matters to.
HasTimed(n) ==
    \/ \E a \in Actors : belief[n][a] > 0
    \/ \E s \in Slots : \/ /\ req[n][s] # None /\ req[n][s].type # "release"
                          /\ req[n][s].age < AgeCap
                       \/ /\ rep[n][s] # None /\ rep[n][s].type # "release"
                          /\ rep[n][s].granted /\ rep[n][s].age < AgeCap

\* How far each node's clock moves in one tick (Rate for a node where it
\* makes no difference, to avoid generating the same state several times).
ClockSteps ==
    {d \in [Nodes -> (Rate - Drift)..(Rate + Drift)] :
        \A n \in Nodes : HasTimed(n) \/ d[n] = Rate}

\* The keeper drops a lease whose belief runs out during a tick in which the
\* local clocks advance by d (KeeperCore::expire).  Model bound: at once;
\* the keeper's loop does it at its next round, which it schedules for the
\* belief's end.
BeliefExpires(d) ==
    btoken' = [n \in Nodes |->
                [a \in Actors |->
                   IF belief[n][a] > d[n] THEN btoken[n][a] ELSE 0]]

\* One tick of the store's clock.  Each node's local clock advances by some
\* amount in Rate-Drift .. Rate+Drift (slow and fast clocks).
Tick ==
    \E d \in ClockSteps :
        /\ store' = [a \in Actors |-> [store[a] EXCEPT !.ttl = Max(0, @ - 1)]]
        /\ belief' = [n \in Nodes |->
                        [a \in Actors |-> Max(0, belief[n][a] - d[n])]]
        /\ BeliefExpires(d)
        /\ req' = [n \in Nodes |-> [s \in Slots |-> AgedReq(req[n][s], d[n])]]
        /\ rep' = [n \in Nodes |-> [s \in Slots |-> AgedRep(rep[n][s], d[n])]]
        /\ UNCHANGED <<up, inc, releasing, orphans, histVars>>

Next ==
    \/ Tick
    \/ \E n \in Nodes :
        \/ \E a \in Actors : \/ SendAcquire(n, a) \/ SendRenew(n, a)
                             \/ SendRelease(n, a) \/ RetryRelease(n, a)
        \/ \E s \in Slots : \/ Apply(n, s) \/ LoseRequest(n, s)
                            \/ LoseReply(n, s) \/ Receive(n, s)
                            \/ Abandon(n, s)
        \/ Crash(n) \/ Restart(n)
    \/ \E o \in orphans : ApplyOrphan(o) \/ LoseOrphan(o)

Spec == Init /\ [][Next]_vars

-----------------------------------------------------------------------------
(* Fairness for the liveness check: time passes; a live node that does not *)
(* hold the lease keeps asking for it, and the keeper keeps retrying an    *)
(* unresolved release; a request that is retried forever is eventually     *)
(* applied, and a reply that is sent again and again eventually arrives     *)
(* (strong fairness: the network may drop any finite number of attempts);  *)
(* every orphan eventually stops travelling (the network does not           *)
(* duplicate a request forever).  Crash and Restart get no fairness: a      *)
(* crashed node may stay down for ever.  Only the slots a configuration     *)
(* uses get fairness conditions (each one costs TLC time).                  *)

UsedSlots == IF LoopSlot \/ OwnerOverlap THEN Slots ELSE {"owner"}

\* (The keeper refuses to acquire while a release is unresolved, so at most
\* one of the two is enabled.)
WantsLease(n, a) == ~Believes(n, a) /\ SendAcquire(n, a)

OrphanGone ==
    \E o \in orphans : \/ ApplyOrphan(o) /\ o \notin orphans'
                       \/ LoseOrphan(o)

BaseFairness ==
    /\ WF_vars(Tick)
    /\ \A n \in Nodes :
        /\ \A a \in Actors : WF_vars(WantsLease(n, a) \/ RetryRelease(n, a))
        /\ \A s \in UsedSlots : SF_vars(Receive(n, s))
    /\ WF_vars(OrphanGone)

LiveSpec ==
    /\ Spec /\ BaseFairness
    /\ \A n \in Nodes, s \in UsedSlots : SF_vars(Apply(n, s))

\* Wrong assumption, for the negative liveness check: only weak fairness on
\* applying requests, so the network may drop every retry.
WeakLiveSpec ==
    /\ Spec /\ BaseFairness
    /\ \A n \in Nodes, s \in UsedSlots : WF_vars(Apply(n, s))

-----------------------------------------------------------------------------
(* Properties                                                              *)

Msg(m) == /\ m.type \in ReqTypes /\ m.actor \in Actors /\ m.token \in Nat

TypeOK ==
    /\ \A a \in Actors :
         /\ store[a].holder \in Holders \cup {None}
         /\ store[a].ttl \in 0..LeaseDuration
         /\ store[a].token \in Nat
         /\ store[a].holder = None => store[a].ttl = 0
    /\ up \in [Nodes -> BOOLEAN]
    /\ inc \in [Nodes -> Incs]
    /\ \A n \in Nodes, a \in Actors :
         /\ belief[n][a] \in 0..AgeCap
         /\ btoken[n][a] \in Nat
         /\ releasing[n][a] \in Nat
         /\ (belief[n][a] = 0) <=> (btoken[n][a] = 0)
    /\ \A n \in Nodes, s \in Slots :
         /\ req[n][s] = None \/ (Msg(req[n][s]) /\ req[n][s].age \in 0..AgeCap)
         /\ rep[n][s] = None
            \/ /\ Msg(rep[n][s])
               /\ rep[n][s].type # "release" =>
                     /\ rep[n][s].granted \in BOOLEAN
                     /\ rep[n][s].age \in 0..AgeCap
         /\ req[n][s] = None \/ rep[n][s] = None
         /\ ~up[n] => (req[n][s] = None /\ rep[n][s] = None)
    /\ \A n \in Nodes :
         ~up[n] => \A a \in Actors : belief[n][a] = 0 /\ btoken[n][a] = 0
                                     /\ releasing[n][a] = 0
    /\ \A o \in orphans : Msg(o) /\ o.holder \in Holders
    /\ Cardinality(orphans) <= MaxOrphans

\* At most one node believes it holds the lease of an actor.
LeaseUniqueness ==
    \A a \in Actors : \A n, m \in Nodes :
        (Believes(n, a) /\ Believes(m, a)) => n = m

\* A node's belief implies the store's record names it (its current
\* process) as holder of an unexpired lease, so the belief ends no later
\* than the store's expiry.
BeliefConsistency ==
    \A n \in Nodes, a \in Actors :
        Believes(n, a) => (store[a].holder = Id(n) /\ Valid(store[a]))

\* Every renewal the store granted was requested by the holder of an
\* unexpired lease, for its current tenure.  Checked when the store applies
\* a renewal: history variable badRenew records the first one granted to a
\* requester that is not the holder, or for an expired lease, or with
\* another tenure's token.
RenewalRequiresOwnership == badRenew = None

\* A free or expired lease can be claimed: an acquire by any holder,
\* applied now, would be granted.
ExpiredLeaseClaimable ==
    \A a \in Actors, h \in Holders :
        ~Valid(store[a]) =>
            Decide(store[a], [type |-> "acquire", token |-> 0], h).granted

\* Every write of the store keeps or raises the actor's token, and a write
\* that hands the lease to a holder other than the record's valid holder (a
\* new tenure: takeover of a free or expired lease) raises it.  Checked
\* when the store applies a request: history variable badToken records the
\* first write that broke this.
FencingTokenMonotonic == badToken = None

\* Liveness.  If crashes eventually stop and some node stays up, then every
\* actor's lease is, again and again, held in the store by a live process:
\* leases of dead processes expire and are taken over, lost messages are
\* retried.
LeaseHeldByLiveNode(a) ==
    \E n \in Nodes : up[n] /\ store[a].holder = Id(n) /\ Valid(store[a])

EventualLeaseResolution ==
    (<>[][\A n \in Nodes : ~Crash(n)]_vars /\ <>[](\E n \in Nodes : up[n]))
        => \A a \in Actors : []<>LeaseHeldByLiveNode(a)

\* State constraint for the safety configurations.
TokenBound == \A a \in Actors : store[a].token <= MaxToken

\* Nodes are interchangeable: the safety configurations check one
\* representative of each permutation of the node ids (SYMMETRY; not for
\* liveness, where TLC does not support it).
NodeSymmetry == Permutations(Nodes)

=============================================================================
