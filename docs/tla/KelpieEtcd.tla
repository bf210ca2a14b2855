----------------------------- MODULE KelpieEtcd -----------------------------
(***************************************************************************)
(* Kelpie's etcd lease backend (crates/kelpie-lease/src/etcd), as a        *)
(* protocol of its own: it does not run decide(); it builds leases from    *)
(* etcd's primitives.                                                      *)
(*                                                                         *)
(*  * Each node has one session: an etcd lease with a TTL, kept alive by   *)
(*    keepalives.  etcd counts the TTL on its leader's clock; when it runs *)
(*    out, etcd revokes the session (some time later) and deletes every    *)
(*    key attached to it.  A keepalive of a session whose TTL ran out but  *)
(*    that is not revoked yet extends nothing and answers "lease not       *)
(*    found" (etcd's lessor Renew waits for the revocation), though a put  *)
(*    may still attach a key to it; the node then does not believe the     *)
(*    grant (ops.rs: KeepAlive::Expired).  A new leader extends every      *)
(*    lease to its full TTL when it takes over (etcd's lessor Promote),    *)
(*    expired ones not yet revoked included.                               *)
(*  * An actor's lease is one key attached to its holder's session.  Its   *)
(*    fencing token is the key's create_revision: the cluster revision of  *)
(*    the transaction that created it.  Revisions increase with every      *)
(*    write, so a key created again has a larger one.                      *)
(*  * acquire: "if the key's version is 0, put it attached to my session;  *)
(*    read it" with the session's keepalive sent beside it (ops.rs).       *)
(*    A key the node already holds is returned as it is.                  *)
(*  * renew: a keepalive of the session, and "if the key's                 *)
(*    create_revision is my token, put it again; read it".                 *)
(*  * release: "if the key's create_revision is my token, delete it".      *)
(*  * The node believes it holds the lease from a granting reply until its *)
(*    local clock reaches  sent_local + (Rate - Drift) * TTL - Margin,     *)
(*    measured from when it SENT the request whose reply granted it (the   *)
(*    keepalive joined to it refreshed the session no earlier).  A later   *)
(*    grant with the same token never shortens the belief.                 *)
(*  * A handover waits for the key's deletion by watch and then acquires   *)
(*    (handover.rs): the watch event only wakes the waiter; the acquire's  *)
(*    transaction decides.  With Handover, a refused node reads the key    *)
(*    and, if it exists, watches for its deletion from the revision after  *)
(*    the read before it acquires again (acquire_waiting); without it, the *)
(*    node may send its acquire again at once (polling).                   *)
(*  * With Crashes, a node's process may crash and stay down (never the    *)
(*    last one up); its session then lives until its TTL runs out.         *)
(*                                                                         *)
(* Time is kept relative, as in KelpieLease.tla: ttl[n] is the session's   *)
(* remaining TTL in leader ticks, belief[n].left and a request's age are   *)
(* distances on node n's local clock, and Tick moves every local clock by  *)
(* Rate - Drift .. Rate + Drift units per leader tick.  The revision is    *)
(* the one unbounded quantity: the state constraint RevBound bounds it.    *)
(*                                                                         *)
(* Assumptions of the model: one actor; one request in flight per node; a  *)
(* request the node gave up on before etcd applied it is never applied     *)
(* (Lose).  Each is a simplification the implementation does not rely on: *)
(* etcd's compares make a late acquire create a key nobody believes in,   *)
(* and a late renewal or release of an old token fail.                     *)
(*                                                                         *)
(* The Bug* constants switch on the backend mutations the simulator also   *)
(* injects; docs/tla/etcd/*.cfg run each against its invariant.            *)
(*                                                                         *)
(* Liveness (end of the module): LiveSpec adds fairness, and a renaming of *)
(* the revisions (Compact) instead of the state constraint;                *)
(* EventualLeaseResolution says that once leader changes stop, a live      *)
(* node holds the actor in etcd again and again.                           *)
(***************************************************************************)
EXTENDS Naturals, FiniteSets, TLC

CONSTANTS
    Nodes,
    None,           \* a model value: no holder
    TTL,            \* session TTL, in leader ticks
    Rate,           \* nominal local-clock units per leader tick
    Drift,          \* local clocks advance Rate +/- Drift per tick
    Margin,         \* safety margin of the belief, in local units
    MaxRev,         \* bound on etcd's revision (state constraint)
    Crashes,        \* a node may crash and stay down (not the last one up)
    Handover,       \* a refused node waits for the key's deletion by watch
    BugBlindPut,          \* acquire puts without comparing the key's version
    BugModRevisionToken,  \* the token is the key's mod_revision (changes on renew)
    BugBeliefFromReply,   \* the belief is measured from the reply, not the send
    BugTrustWatch,        \* a watch event of the key's deletion is taken as a grant
    BugWatchFromNow,      \* the handover's watch starts when it is opened, not
                          \* from the revision after the read (liveness mutation)
    BugIgnoreExpiredKeepAlive  \* a grant is believed though the keepalive sent
                               \* with it found the session expired

ASSUME /\ TTL \in Nat \ {0}
       /\ Rate \in Nat \ {0} /\ Drift \in Nat /\ Drift < Rate
       /\ Margin \in Nat \ {0}
       /\ (Rate - Drift) * TTL > Margin
       /\ MaxRev \in Nat \ {0}
       /\ \A b \in {Crashes, Handover, BugBlindPut, BugModRevisionToken,
                    BugBeliefFromReply, BugTrustWatch, BugWatchFromNow,
                    BugIgnoreExpiredKeepAlive} :
            b \in BOOLEAN

\* How long a grant is believed, in local units from the request's send.
BeliefDuration == (Rate - Drift) * TTL - Margin

NoKey == [exists |-> FALSE, holder |-> None, create |-> 0, mod |-> 0]
NoReq == [type |-> "none", token |-> 0, age |-> 0, applied |-> FALSE,
          ok |-> FALSE, rtoken |-> 0]
NoBelief == [token |-> 0, left |-> 0]
NoOp == [type |-> "none", node |-> None, token |-> 0, ok |-> FALSE,
         rtoken |-> 0, before |-> NoKey, newTenure |-> FALSE, maxBefore |-> 0]

VARIABLES
    rev,        \* etcd's revision: the last write's
    alive,      \* alive[n]: node n's session lease exists in etcd
    ttl,        \* ttl[n]: leader ticks left of it (0: expired, not yet revoked)
    key,        \* the actor's key
    req,        \* req[n]: node n's request in flight, or NoReq
    belief,     \* belief[n]: the token n believes it holds, and for how long
    maxHanded,  \* the largest token any reply handed out (history)
    last,       \* the last operation etcd applied, for the action invariants
    up,         \* up[n]: node n's process runs (FALSE: crashed, for ever)
    hand,       \* hand[n]: n's handover: "idle", "opening" its watch, "watching"
    seen        \* seen[n]: the key was deleted at a revision the watch of
                \* n's handover delivers (after its read, or after its
                \* opening under BugWatchFromNow)

vars == <<rev, alive, ttl, key, req, belief, maxHanded, last, up, hand, seen>>

Max(a, b) == IF a > b THEN a ELSE b
Min(a, b) == IF a < b THEN a ELSE b

Tokens == 0..MaxRev + 1
KeyType == [exists : BOOLEAN, holder : Nodes \cup {None},
            create : Tokens, mod : Tokens]

TypeOK ==
    /\ rev \in Tokens
    /\ alive \in [Nodes -> BOOLEAN]
    /\ ttl \in [Nodes -> 0..TTL]
    /\ key \in KeyType
    /\ req \in [Nodes -> [type : {"none", "acquire", "renew", "release"},
                          token : Tokens, age : 0..BeliefDuration,
                          applied : BOOLEAN, ok : BOOLEAN, rtoken : Tokens]]
    /\ belief \in [Nodes -> [token : Tokens, left : 0..BeliefDuration]]
    /\ maxHanded \in Tokens
    /\ up \in [Nodes -> BOOLEAN]
    /\ hand \in [Nodes -> {"idle", "opening", "watching"}]
    /\ seen \in [Nodes -> BOOLEAN]

Init ==
    /\ rev = 0
    /\ alive = [n \in Nodes |-> FALSE]
    /\ ttl = [n \in Nodes |-> 0]
    /\ key = NoKey
    /\ req = [n \in Nodes |-> NoReq]
    /\ belief = [n \in Nodes |-> NoBelief]
    /\ maxHanded = 0
    /\ last = NoOp
    /\ up = [n \in Nodes |-> TRUE]
    /\ hand = [n \in Nodes |-> "idle"]
    /\ seen = [n \in Nodes |-> FALSE]

Believes(n) == belief[n].left > 0

\* The token a reply hands out for key k.
TokenOf(k) == IF BugModRevisionToken THEN k.mod ELSE k.create

\* The compare of renew and release: "the key still carries my token".
Carries(k, n, t) == k.exists /\ k.holder = n /\ TokenOf(k) = t

-----------------------------------------------------------------------------
(* Node actions *)

Send(n, type, token) ==
    req' = [req EXCEPT ![n] = [NoReq EXCEPT !.type = type, !.token = token]]

NodeVars == <<up, hand, seen>>

\* A node in a handover waits for its watch before it acquires again.
SendAcquire(n) ==
    /\ up[n] /\ req[n] = NoReq /\ ~Believes(n) /\ hand[n] = "idle"
    /\ Send(n, "acquire", 0)
    /\ UNCHANGED <<rev, alive, ttl, key, belief, maxHanded, last, NodeVars>>

SendRenew(n) ==
    /\ up[n] /\ req[n] = NoReq /\ Believes(n)
    /\ Send(n, "renew", belief[n].token)
    /\ UNCHANGED <<rev, alive, ttl, key, belief, maxHanded, last, NodeVars>>

\* Placement deactivates before it releases: the belief ends at once.
SendRelease(n) ==
    /\ up[n] /\ req[n] = NoReq /\ Believes(n)
    /\ Send(n, "release", belief[n].token)
    /\ belief' = [belief EXCEPT ![n] = NoBelief]
    /\ UNCHANGED <<rev, alive, ttl, key, maxHanded, last, NodeVars>>

\* The node gives up on its request (timeout, lost request or reply).
Lose(n) ==
    /\ req[n] # NoReq
    /\ req' = [req EXCEPT ![n] = NoReq]
    /\ UNCHANGED <<rev, alive, ttl, key, belief, maxHanded, last, NodeVars>>

\* The node's process crashes and stays down: it forgets its belief and its
\* request (which etcd never applies); its session stays in etcd until its
\* TTL runs out.  Not the last node up (a fault budget: some node stays up).
Crash(n) ==
    /\ Crashes /\ up[n] /\ \E m \in Nodes \ {n} : up[m]
    /\ up' = [up EXCEPT ![n] = FALSE]
    /\ req' = [req EXCEPT ![n] = NoReq]
    /\ belief' = [belief EXCEPT ![n] = NoBelief]
    /\ hand' = [hand EXCEPT ![n] = "idle"]
    /\ seen' = [seen EXCEPT ![n] = FALSE]
    /\ last' = NoOp
    /\ UNCHANGED <<rev, alive, ttl, key, maxHanded>>

\* The reply arrives.
Receive(n) ==
    /\ req[n].applied
    /\ LET r == req[n]
           left == IF BugBeliefFromReply THEN BeliefDuration
                   ELSE BeliefDuration - r.age
       IN belief' =
            [belief EXCEPT ![n] =
                CASE r.type \in {"acquire", "renew"} /\ r.ok ->
                        IF belief[n].token = r.rtoken
                        THEN [token |-> r.rtoken, left |-> Max(left, belief[n].left)]
                        ELSE [token |-> r.rtoken, left |-> left]
                  [] r.type = "renew" /\ ~r.ok -> NoBelief
                  [] OTHER -> belief[n]]
    /\ req' = [req EXCEPT ![n] = NoReq]
       \* acquire_waiting: a refused node reads the key; if it still exists,
       \* the node watches for its deletion from the revision after the read
       \* (handover.rs, watch_until_deleted); if not, it acquires again.
    /\ IF Handover /\ req[n].type = "acquire" /\ ~req[n].ok /\ key.exists
       THEN /\ hand' = [hand EXCEPT ![n] = "opening"]
            /\ seen' = [seen EXCEPT ![n] = FALSE]
       ELSE UNCHANGED <<hand, seen>>
    /\ UNCHANGED <<rev, alive, ttl, key, maxHanded, last, up>>

\* The handover's watch is opened: from the revision after the read, so a
\* deletion since the read is delivered; under BugWatchFromNow from the
\* revision current at the opening, so such a deletion is missed.
OpenWatch(n) ==
    /\ hand[n] = "opening"
    /\ hand' = [hand EXCEPT ![n] = "watching"]
    /\ seen' = IF BugWatchFromNow THEN [seen EXCEPT ![n] = FALSE] ELSE seen
    /\ UNCHANGED <<rev, alive, ttl, key, req, belief, maxHanded, last, up>>

\* The watch delivers the deletion: the handover ends, the node acquires.
WatchEvent(n) ==
    /\ hand[n] = "watching" /\ seen[n]
    /\ hand' = [hand EXCEPT ![n] = "idle"]
    /\ seen' = [seen EXCEPT ![n] = FALSE]
    /\ UNCHANGED <<rev, alive, ttl, key, req, belief, maxHanded, last, up>>

\* Mutation: the key's deletion seen by a watch is taken as a grant of a
\* new tenure, without the acquire's transaction.
TrustWatch(n) ==
    /\ BugTrustWatch
    /\ up[n] /\ ~key.exists /\ req[n] = NoReq /\ ~Believes(n) /\ rev < MaxRev
    /\ belief' = [belief EXCEPT ![n] = [token |-> rev + 1, left |-> BeliefDuration]]
    /\ UNCHANGED <<rev, alive, ttl, key, req, maxHanded, last, NodeVars>>

-----------------------------------------------------------------------------
(* etcd applies a request atomically *)

Reply(n, ok, rtoken) ==
    req' = [req EXCEPT ![n].applied = TRUE, ![n].ok = ok, ![n].rtoken = rtoken]

Record(n, type, ok, rtoken, newTenure) ==
    last' = [type |-> type, node |-> n, token |-> req[n].token, ok |-> ok,
             rtoken |-> rtoken, before |-> key, newTenure |-> newTenure,
             maxBefore |-> maxHanded]

Handed(ok, rtoken) == maxHanded' = IF ok THEN Max(maxHanded, rtoken) ELSE maxHanded

\* The key's deletion reaches every handover's watch that is open or opening.
Deleted == seen' = [m \in Nodes |-> seen[m] \/ hand[m] # "idle"]

\* Whether a keepalive of n's session succeeds now: not while its TTL has run
\* out and etcd has not revoked it yet ("lease not found"); with no session,
\* the node grants a new one.
KeptAlive(n) == ~alive[n] \/ ttl[n] > 0

\* A keepalive of n's session (a new session if it has none).  It extends an
\* expired session not yet revoked by nothing: only a leader change does.
KeepAlive(n) ==
    /\ alive' = [alive EXCEPT ![n] = TRUE]
    /\ ttl' = [ttl EXCEPT ![n] = IF KeptAlive(n) THEN TTL ELSE 0]

\* The reply to n's renewal whose transaction etcd applied with outcome ok: a
\* grant only if the keepalive sent beside it succeeded too (ops.rs answers
\* KeepAlive::Expired with a refusal and retires the session).  etcd's own
\* decision, ok, is what Record keeps for the action invariants.
Granted(n, ok) == ok /\ (KeptAlive(n) \/ BugIgnoreExpiredKeepAlive)

\* The keepalive sent beside n's acquire finds n's session expired, not yet
\* revoked (ops.rs: KeepAlive::Expired).  The node retires the session and
\* tries again on a new one, first deleting its own key on the old session
\* (delete_other_incarnation): the key this transaction put there, or one an
\* earlier grant put there.  One step here, which leaves n with no session and
\* no key, and no grant: a put of an absent key that the node deletes at once
\* changes nothing but revisions nobody holds.
RetireExpiredSession(n) ==
    /\ alive' = [alive EXCEPT ![n] = FALSE]
    /\ ttl' = [ttl EXCEPT ![n] = 0]
    /\ IF key.exists /\ key.holder = n
       THEN /\ rev' = rev + 1
            /\ key' = NoKey
            /\ Deleted
       ELSE UNCHANGED <<rev, key, seen>>
    /\ Reply(n, FALSE, 0)
    /\ last' = NoOp
    /\ UNCHANGED <<belief, maxHanded, up, hand>>

\* An acquire whose keepalive kept n's session (or made a new one); under
\* BugIgnoreExpiredKeepAlive also one whose keepalive found it expired, whose
\* grant the node then believes.
ApplyAcquireOnSession(n) ==
    /\ KeepAlive(n)
    /\ IF ~key.exists \/ (BugBlindPut /\ key.holder # n)
       THEN \* put: a key that exists keeps its create_revision (etcd's put)
            LET k == [exists |-> TRUE, holder |-> n,
                      create |-> IF key.exists THEN key.create ELSE rev + 1,
                      mod |-> rev + 1]
            IN /\ rev' = rev + 1
               /\ key' = k
               /\ Reply(n, TRUE, TokenOf(k))
               /\ Handed(TRUE, TokenOf(k))
               /\ Record(n, "acquire", TRUE, TokenOf(k), TRUE)
       ELSE LET ok == key.holder = n
            IN /\ UNCHANGED <<rev, key>>
               /\ Reply(n, ok, IF ok THEN TokenOf(key) ELSE 0)
               /\ Handed(ok, TokenOf(key))
               /\ Record(n, "acquire", ok, IF ok THEN TokenOf(key) ELSE 0, FALSE)
    /\ UNCHANGED <<belief, NodeVars>>

ApplyAcquire(n) ==
    /\ req[n].type = "acquire" /\ ~req[n].applied /\ rev < MaxRev
    /\ IF ~KeptAlive(n) /\ ~BugIgnoreExpiredKeepAlive
       THEN RetireExpiredSession(n)
       ELSE ApplyAcquireOnSession(n)

ApplyRenew(n) ==
    /\ req[n].type = "renew" /\ ~req[n].applied /\ rev < MaxRev
    /\ IF alive[n] /\ Carries(key, n, req[n].token)
       THEN LET k == [key EXCEPT !.mod = rev + 1]
            IN /\ KeepAlive(n)
               /\ rev' = rev + 1
               /\ key' = k
               /\ Reply(n, Granted(n, TRUE), TokenOf(k))
               /\ Handed(Granted(n, TRUE), TokenOf(k))
               /\ Record(n, "renew", TRUE, TokenOf(k), FALSE)
       ELSE \* the session is gone (lease not found) or the compare failed
            /\ IF alive[n] THEN KeepAlive(n) ELSE UNCHANGED <<alive, ttl>>
            /\ UNCHANGED <<rev, key>>
            /\ Reply(n, FALSE, 0)
            /\ Handed(FALSE, 0)
            /\ Record(n, "renew", FALSE, 0, FALSE)
    /\ UNCHANGED <<belief, NodeVars>>

ApplyRelease(n) ==
    /\ req[n].type = "release" /\ ~req[n].applied /\ rev < MaxRev
    /\ IF Carries(key, n, req[n].token)
       THEN /\ rev' = rev + 1
            /\ key' = NoKey
            /\ Reply(n, TRUE, 0)
            /\ Record(n, "release", TRUE, 0, FALSE)
            /\ Deleted
       ELSE /\ UNCHANGED <<rev, key>>
            /\ Reply(n, FALSE, 0)
            /\ Record(n, "release", FALSE, 0, FALSE)
            /\ UNCHANGED seen
    /\ UNCHANGED <<alive, ttl, belief, maxHanded, up, hand>>

\* etcd revokes a session whose TTL ran out, deleting the keys attached to it.
Expire(n) ==
    /\ alive[n] /\ ttl[n] = 0
    /\ alive' = [alive EXCEPT ![n] = FALSE]
    /\ IF key.exists /\ key.holder = n
       THEN /\ rev < MaxRev
            /\ rev' = rev + 1
            /\ key' = NoKey
            /\ Deleted
       ELSE UNCHANGED <<rev, key, seen>>
    /\ last' = NoOp
    /\ UNCHANGED <<ttl, req, belief, maxHanded, up, hand>>

\* A new leader extends every lease to its full TTL.
LeaderChange ==
    /\ ttl' = [n \in Nodes |-> IF alive[n] THEN TTL ELSE ttl[n]]
    /\ last' = NoOp
    /\ UNCHANGED <<rev, alive, key, req, belief, maxHanded, NodeVars>>

\* One tick of the leader's clock; each node's clock moves by its own amount.
Tick ==
    /\ \E d \in [Nodes -> (Rate - Drift)..(Rate + Drift)] :
        /\ belief' = [n \in Nodes |->
                        IF belief[n].left > d[n]
                        THEN [belief[n] EXCEPT !.left = @ - d[n]]
                        ELSE NoBelief]
        /\ req' = [n \in Nodes |->
                     IF req[n] = NoReq THEN NoReq
                     ELSE [req[n] EXCEPT !.age = Min(BeliefDuration, @ + d[n])]]
    /\ ttl' = [n \in Nodes |-> IF ttl[n] > 0 THEN ttl[n] - 1 ELSE 0]
    /\ last' = NoOp
    /\ UNCHANGED <<rev, alive, key, maxHanded, NodeVars>>

Next ==
    \/ \E n \in Nodes :
        \/ SendAcquire(n) \/ SendRenew(n) \/ SendRelease(n)
        \/ Lose(n) \/ Receive(n) \/ TrustWatch(n) \/ Crash(n)
        \/ OpenWatch(n) \/ WatchEvent(n)
        \/ ApplyAcquire(n) \/ ApplyRenew(n) \/ ApplyRelease(n) \/ Expire(n)
    \/ LeaderChange
    \/ Tick

Spec == Init /\ [][Next]_vars

-----------------------------------------------------------------------------
(* The properties of KelpieLease.tla, for this backend *)

\* At most one node believes it holds the actor.
LeaseUniqueness ==
    Cardinality({n \in Nodes : Believes(n)}) <= 1

\* A node's belief is backed by etcd: its key, with its token, attached to a
\* session etcd will not revoke yet.
BeliefConsistency ==
    \A n \in Nodes :
        Believes(n) =>
            /\ key.exists /\ key.holder = n /\ key.create = belief[n].token
            /\ alive[n] /\ ttl[n] > 0

\* A renewal etcd granted renewed the renewing node's own tenure.
RenewalRequiresOwnership ==
    (last.type = "renew" /\ last.ok) =>
        /\ last.before.exists /\ last.before.holder = last.node
        /\ last.before.create = last.token

\* An acquire of a key that does not exist (released, or deleted with its
\* expired session) is granted.
ExpiredLeaseClaimable ==
    (last.type = "acquire" /\ ~last.before.exists) => last.ok

\* A renewal keeps the token, and a new tenure's token exceeds every token
\* handed out before.
FencingTokenMonotonic ==
    last.ok =>
        /\ last.type = "renew" => last.rtoken = last.token
        /\ last.newTenure => last.rtoken > last.maxBefore

RevBound == rev <= MaxRev

NodeSymmetry == Permutations(Nodes)

-----------------------------------------------------------------------------
(* Liveness                                                                *)
(*                                                                         *)
(* Revisions.  TLC's liveness check is unsound under a state constraint,   *)
(* so LiveSpec bounds the revision another way.  The protocol only         *)
(* compares revisions with each other (=, <) and takes rev + 1 as a fresh  *)
(* one larger than all; renaming the revisions held in the state by an     *)
(* order-preserving map that keeps 0 therefore changes no future step.     *)
(* After every write, Compact renames them to 0, 1, 2, ... (their ranks)   *)
(* and sets rev to the largest: a stuttering step of the protocol that     *)
(* keeps the state space finite without cutting any behaviour.  RevRoom    *)
(* checks that MaxRev never blocks a write in a compacted state.           *)

UsedRevs ==
    {0, key.create, key.mod, maxHanded}
        \cup {belief[n].token : n \in Nodes}
        \cup {req[n].token : n \in Nodes} \cup {req[n].rtoken : n \in Nodes}

Rank(v) == Cardinality({u \in UsedRevs : u < v})

Compacted ==
    /\ rev = Cardinality(UsedRevs) - 1
    /\ \A v \in UsedRevs : Rank(v) = v

Compact ==
    /\ ~Compacted
    /\ rev' = Cardinality(UsedRevs) - 1
    /\ key' = [key EXCEPT !.create = Rank(@), !.mod = Rank(@)]
    /\ maxHanded' = Rank(maxHanded)
    /\ belief' = [n \in Nodes |-> [belief[n] EXCEPT !.token = Rank(@)]]
    /\ req' = [n \in Nodes |-> [req[n] EXCEPT !.token = Rank(@), !.rtoken = Rank(@)]]
    /\ last' = NoOp
    /\ UNCHANGED <<alive, ttl, NodeVars>>

LiveNext == (Compacted /\ Next) \/ Compact

RevRoom == Compacted => rev < MaxRev

(* Fairness: what must eventually happen once faults stop.                 *)
(*  * Time passes (WF Tick), and Compact, the model's bookkeeping, runs.   *)
(*  * etcd's lessor revokes a session whose TTL ran out (WF Expire): it    *)
(*    stays expired until revoked, since only a leader change extends it   *)
(*    (a keepalive of it finds it expired).                                *)
(*  * A live node that neither believes it holds the actor, nor has a      *)
(*    request in flight, nor waits in a handover, acquires (WF             *)
(*    SendAcquire): Placement keeps asking for an actor it wants; a        *)
(*    keepalive travels with every acquire, so this also keeps the         *)
(*    session of a node that wants the actor alive.                        *)
(*  * A node does not wait for ever: a request in flight is eventually     *)
(*    answered or given up on, by its timeout (WF Receive \/ Lose).        *)
(*  * A request sent again and again is eventually applied (SF on applying *)
(*    a node's requests): the network may lose any finite number of them   *)
(*    (Lose), not all.                                                     *)
(*  * A handover's watch is eventually opened, and a deletion it delivers  *)
(*    eventually arrives (WF OpenWatch, WF WatchEvent).                    *)
(* Leader changes, crashes and lost requests get no fairness.              *)

ApplyAny(n) == ApplyAcquire(n) \/ ApplyRenew(n) \/ ApplyRelease(n)

BaseFairness ==
    /\ WF_vars(Tick) /\ WF_vars(Compact)
    /\ \A n \in Nodes :
        /\ WF_vars(Expire(n))
        /\ WF_vars(SendAcquire(n))
        /\ WF_vars(Receive(n) \/ Lose(n))
        /\ WF_vars(OpenWatch(n)) /\ WF_vars(WatchEvent(n))

LiveSpec ==
    /\ Init /\ [][LiveNext]_vars /\ BaseFairness
    /\ \A n \in Nodes : SF_vars(ApplyAny(n))

\* Wrong assumption, for the negative check: only weak fairness on applying
\* requests, so the network may lose every attempt.
WeakLiveSpec ==
    /\ Init /\ [][LiveNext]_vars /\ BaseFairness
    /\ \A n \in Nodes : WF_vars(ApplyAny(n))

\* The actor's key exists, attached to the unexpired session of a node that
\* is up.
HeldByLiveNode ==
    key.exists /\ up[key.holder] /\ ttl[key.holder] > 0

\* If leader changes eventually stop, then again and again a live node holds
\* the actor in etcd.  Every live node wants the actor (WF SendAcquire) and
\* some node stays up (Crash), so: the lease of a node that crashed expires
\* and is taken over, lost requests are sent again, and a node waiting in a
\* handover acquires once the key is deleted.
EventualLeaseResolution ==
    <>[][~LeaderChange]_vars => []<>HeldByLiveNode

\* The same without the assumption on leader changes: false, since a new
\* leader extends every lease, a crashed node's too, to its full TTL.
EventualLeaseResolutionUnderLeaderChurn ==
    []<>HeldByLiveNode
=============================================================================
