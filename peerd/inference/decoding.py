"""One request's decoding at the entry peer, round by round.

A round runs the committed tokens the pipeline's caches do not hold yet, plus a draft
when speculating, through the pipeline in one pass; verification then commits 1..γ+1
tokens. Plain decoding is the round without a draft.

The entry peer keeps the request's token history. When a pass fails, the peer at
fault is banned with back-off, the next round opens a session on a new route (a
replica of the lost span) and replays the whole history through it in one pass to
rebuild the KV caches, and decoding goes on from where it stopped: same tokens
(greedy), or the same random stream (sampling: the generator belongs to the request,
and a failed round is redrafted from the random state it started with).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import trio

from peerd.inference.options import MAX_GAMMA
from peerd.inference.request import (
    GenerationRequest,
    GenerationStats,
    Logprobs,
    OnToken,
    Round,
    TokenConstraint,
    TokenLogprob,
)
from peerd.inference.sampling import distribution, make_generator, token_logprobs
from peerd.inference.speculative.acceptance import TreeVerdict, verify_sample, verify_tree
from peerd.inference.speculative.drafters import DraftSession, TreeDraftSession
from peerd.inference.speculative.gamma import (
    MAX_TREE_NODES,
    TREE_DEPTH,
    GammaController,
    TreeBudget,
)
from peerd.inference.speculative.ngram import LOOKUP_BRANCHES
from peerd.inference.speculative.tree import TokenTree, chain_prefix
from peerd.inference.swarm.pipeline import PipelineFailure, PipelineSession, StepResult
from peerd.inference.swarm.routing import Route

if TYPE_CHECKING:
    from peerd.inference.generate import Generator


@dataclass(frozen=True, slots=True)
class Proposal:
    """A round's draft after the last committed token (an empty tree: a plain round)."""

    tree: TokenTree
    probs: torch.Tensor | None = None  # [γ, V]: what a sampled chain was drawn from
    grown: bool = False  # a token tree was grown: the tree budget observes its size


NO_DRAFT = Proposal(TokenTree([], []))


class Decoding:
    """The state of one request's decoding, and its steps: `run` opens (or reuses) a
    session, then runs rounds — propose a draft, run the pass, verify, commit — until
    the request ends; a failed pass closes the session and the next round replays."""

    def __init__(self, generator: Generator, request: GenerationRequest, on_token: OnToken,
                 *, reuse_prefix: bool = False, logprobs: Logprobs | None = None,
                 constraint: TokenConstraint | None = None) -> None:
        self.generator = generator
        self.request = request
        self.params = request.params
        # under a constraint no drafter drafts (its tokens would have to be re-verified
        # against the mask of the state each predecessor leaves); greedy decoding drafts
        # the text the constraint forces instead (`forcing`: a key's name, the
        # punctuation between values), verified under each position's own mask, so
        # its output is the plain output
        self.constraint = constraint
        self.mode = request.verify if constraint is None else (
            "greedy" if self.params.temperature == 0.0 else "sample")
        self.forcing = constraint is not None and self.mode == "greedy"
        self.on_token = on_token
        self.reuse_prefix = reuse_prefix
        self.logprobs = logprobs
        self.classes = (generator.token_classes() if self.mode == "adaptive"
                        and generator.token_classes else None)
        drafter = request.drafter if constraint is None else None
        self.stats = GenerationStats(
            prompt_tokens=len(request.prompt_ids), verify=self.mode,
            draft=request.speculative.draft if constraint is None
            else "grammar" if self.forcing else "none")
        self.rng = make_generator(self.params)
        self.gamma = GammaController(fixed=request.speculative.gamma)
        self.budget = TreeBudget()
        self.drafting: DraftSession | None = drafter.start() if drafter is not None else None
        # token trees where the drafter grows them and verification is greedy or adaptive
        self.tree_drafting = self.drafting if (
            request.speculative.tree and self.mode != "sample"
            and isinstance(self.drafting, TreeDraftSession)) else None
        self.stats.tree = self.tree_drafting is not None
        # drafts may run up to MAX_GAMMA positions past the last committed token (a
        # tree: its candidates and lookup branches)
        slack = (MAX_GAMMA if self.forcing else 0) if drafter is None else \
            MAX_GAMMA if self.tree_drafting is None else (
                MAX_TREE_NODES + LOOKUP_BRANCHES * MAX_GAMMA)
        self.max_length = min(len(request.prompt_ids) + self.params.max_tokens + slack,
                              generator.max_session_length)

        self.history = list(request.prompt_ids)  # committed tokens
        self.told = 0  # history[:told] has been given to the drafter
        # features of history[told:] (all but the last one's), for the drafter when it
        # next drafts: rounds that decode plain do not feed it (`tell`)
        self.untold: list[torch.Tensor] = []
        self.fed = 0  # positions whose features the drafter has
        # features of committed positions 0..fed-1 in order, pooled with the session for
        # the next request's drafter (only while drafting)
        self.collected: list[torch.Tensor] = []
        self.reused: torch.Tensor | None = None  # the pooled session's, for positions < kv
        # without a drafter: the features the reused session kept for the prefix this
        # request reuses, pooled again with it for a later speculative request
        self.inherited: torch.Tensor | None = None
        self.kv = 0  # committed positions the pipeline's caches hold
        self.route: Route | None = request.route  # the first session's; None: route anew
        self.session: PipelineSession | None = None
        self.fresh = True  # the session was opened for this request (not taken from the pool)
        self.failures = 0
        self.finished = False
        # what the route returns, when this request is drawn for an audit (audit.py)
        self.kept = generator.audits.keeper()

    async def run(self) -> GenerationStats:
        t_start = time.perf_counter()
        try:
            while not self.finished:
                if self.session is None:
                    await self.open()
                await self.round()
        finally:
            await self.close()
            self.stats.wall_ms = (time.perf_counter() - t_start) * 1e3
        return self.stats

    async def open(self) -> None:
        """A session for the next round, whose caches the round fills from position 0:
        the whole history is (re)played, except, with reuse_prefix and before the
        drafter was told anything, the prefix a pooled session's caches already hold."""
        reuse = self.reuse_prefix and self.told == 0 and not self.untold
        self.session, self.fresh = await self.generator.open(
            self.max_length, self.stats, self.history, self.route, reuse=reuse,
            drafting=self.drafting is not None)
        self.route = None  # a later session routes again: a failure has changed the bans
        if self.kept is not None:
            self.kept.forget()
        if self.budget.plain_ms is None:
            self.budget.plain_ms = self.generator.plain_round(self.session.peers)
        self.kv = 0
        self.inherited = None
        if reuse and not self.fresh:
            self.kv, self.reused = await self.generator.reuse(self.session, self.history,
                                                              self.drafting)
            self.stats.cached_tokens = self.kv
            if self.drafting is None and self.session.features is not None and self.kv:
                self.inherited = self.session.features[:self.kv]
            if self.reused is not None:  # the drafter knows history[:kv] now
                self.told, self.fed = self.kv, self.kv - 1
                self.collected = [self.reused[:self.fed]]

    async def round(self) -> None:
        """Propose, pass, verify, commit; a failed pass leaves the round to be redone."""
        pending = self.history[self.kv:]  # committed, not yet in the caches
        rng_state = self.rng.get_state()  # a failed round is redrafted identically
        t_round = time.perf_counter()
        proposal = await self.propose()
        draft_ms = (time.perf_counter() - t_round) * 1e3
        self.stats.draft_ms += draft_ms
        result = await self.forward(pending, proposal.tree)
        if result is None:  # the pass failed: the next round replays on a new session
            self.rng.set_state(rng_state)
            return
        verdict, scored = await self.verify(result.hidden, len(pending), proposal)
        features = self.advance(len(pending), verdict, result.hidden)
        if self.kv > len(self.request.prompt_ids):  # a decoding round, not the prompt's pass
            self.observe(proposal, verdict, draft_ms, result.wall_ms, t_round)
        await self.commit(verdict.committed(proposal.tree), scored)
        if self.drafting is not None and not self.finished:
            self.untold.append(features)

    async def propose(self) -> Proposal:
        """The drafter drafts after the last committed token once every committed token
        has its features (not in the prompt's pass, nor in a reused prefix's first), as
        far as the request and the session have room; it is told what it lacks first."""
        room = min(self.params.max_tokens - self.stats.completion_tokens - 1,
                   self.max_length - len(self.history))
        if self.forcing:  # the prompt's pass too: the forced text needs no features
            assert self.constraint is not None
            forced = self.constraint.forced(min(MAX_GAMMA, room)) if room > 0 else []
            return Proposal(TokenTree.chain(forced)) if forced else NO_DRAFT
        if self.drafting is None or self.kv == 0 or self.fed < len(self.history) - 1 \
                or room <= 0:
            return NO_DRAFT
        if self.tree_drafting is None:
            depth = min(self.gamma.next(), room)
            if depth <= 0:
                return NO_DRAFT
            await self.tell(self.drafting)
            chain = await self.generator.in_thread(self.drafting.propose, depth, self.params,
                                                   self.rng)
            return Proposal(TokenTree.chain(chain.tokens), chain.probs)
        # auto with a head: TREE_DEPTH deep (its lookup branches), the head's levels
        # stopping where they stop paying (deeper)
        levels = self.tree_drafting.levels and self.gamma.fixed is None
        depth = min(TREE_DEPTH if levels else self.gamma.next(), room)
        if depth <= 0 or not self.budget.drafting():
            return NO_DRAFT
        await self.tell(self.tree_drafting)
        tree = await self.generator.in_thread(
            self.tree_drafting.propose_tree, depth, self.budget.choose,
            self.budget.deeper if levels else None)
        # every position this FORWARD writes must fit the session
        return Proposal(tree.head(self.max_length - len(self.history)), grown=True)

    async def tell(self, drafting: DraftSession) -> None:
        """Give the drafter the committed tokens it lacks, with their features."""
        if self.told == len(self.history):
            return
        features = torch.cat(self.untold) if len(self.untold) > 1 else self.untold[0]
        await self.generator.in_thread(drafting.extend, self.history[self.told:], features)
        self.told, self.untold = len(self.history), []

    async def forward(self, pending: list[int], draft: TokenTree) -> StepResult | None:
        """The pending tokens and the draft through the pipeline in one pass; None when
        the pass failed (see `failed`)."""
        session = self.session
        assert session is not None
        t0 = time.perf_counter()
        ids = pending + draft.tokens
        hidden = await self.generator.in_thread(self.generator.embed, ids)
        self.stats.head_ms += (time.perf_counter() - t0) * 1e3
        # a chain needs no parents; a tree hangs below the last pending token
        tree = () if draft.is_chain() else (
            *range(-1, len(pending) - 1),
            *(p + len(pending) if p >= 0 else len(pending) - 1 for p in draft.parents))
        try:
            result = await session.step(hidden, self.kv,
                                        keep=self.kv if session.held > self.kv else -1,
                                        tree=tree)
        except PipelineFailure as failure:
            await self.failed(failure)
            return None
        session.held = self.kv + len(ids)  # committed + this round's drafts
        self.stats.steps += 1
        self.stats.pipeline_ms += result.wall_ms
        self.stats.compute_ms += result.compute_ms
        return result

    async def failed(self, failure: PipelineFailure) -> None:
        """Close the session; the next round opens another. A pooled session that went
        stale before its first pass is no one's fault; any other failure bans its
        culprit and counts toward giving up (Generator.blame)."""
        assert self.session is not None
        await self.session.close()
        self.session = None
        if not self.fresh and self.stats.steps == 0:
            return
        self.failures += 1
        self.generator.blame(failure, self.failures)
        self.stats.reroutes += 1

    async def verify(self, hidden: torch.Tensor, pending: int, proposal: Proposal
                     ) -> tuple[TreeVerdict, list[TokenLogprob]]:
        t0 = time.perf_counter()
        verdict: TreeVerdict
        scored: list[TokenLogprob]
        verdict, scored = await self.generator.in_thread(self._verify, hidden, pending,
                                                         proposal.tree, proposal.probs)
        self.stats.head_ms += (time.perf_counter() - t0) * 1e3
        return verdict, scored

    def advance(self, pending: int, verdict: TreeVerdict, hidden: torch.Tensor
                ) -> torch.Tensor:
        """Move the marks past what this pass committed (the caches' valid prefix, the
        positions with features); returns the features [n, H] the drafter lacks."""
        # the slots of the committed positions this pass ran: the pending tokens, then
        # the accepted path (all of it valid; only a prefix of slots that is a chain
        # stays in the caches, the rest is sent again next round)
        slots = [*range(pending), *(pending + n for n in verdict.path)]
        ran_to = self.kv + len(slots)  # committed positions with features now
        features = hidden[0, slots[max(self.fed, self.kv) - self.kv:]]  # [n, H]
        if self.fed < self.kv and self.reused is not None:  # the last reused position's first
            features = torch.cat([self.reused[self.fed:self.kv], features])  # [n, H]
        if self.drafting is not None:
            self.collected.append(features)
        if self.kept is not None:
            self.kept.keep(self.kv, hidden[0, slots])
        self.kv += pending + chain_prefix(verdict.path)
        self.fed = ran_to
        return features

    def observe(self, proposal: Proposal, verdict: TreeVerdict, draft_ms: float,
                pipeline_ms: float, t_round: float) -> None:
        """Record a decoding round; γ and the tree budget learn from it."""
        draft = proposal.tree
        self.stats.rounds.append(Round(draft.depth(), len(verdict.path), draft_ms,
                                       pipeline_ms, len(draft)))
        round_ms = (time.perf_counter() - t_round) * 1e3
        self.gamma.observe(draft.depth(), len(verdict.path), round_ms)
        if proposal.grown:
            self.budget.observe(len(draft), *draft.estimated(verdict.path),
                                round_ms - draft_ms, committed=len(verdict.path) + 1,
                                draft_ms=draft_ms)
        elif not len(draft):
            self.budget.observe_plain(round_ms)
        if not len(draft) and self.session is not None:  # what a later tree must beat here
            self.generator.plain_round(self.session.peers, self.budget.plain_ms)

    async def commit(self, tokens: list[int], scored: list[TokenLogprob]) -> None:
        """Hand the round's tokens to the caller in order, until the request ends: an
        EOS, a stop (on_token returned False) or max_tokens."""
        for i, token in enumerate(tokens):
            self.history.append(token)
            self.stats.completion_tokens += 1
            eos = token in self.generator.eos_ids
            if self.logprobs is not None and not eos:
                self.logprobs.entries.append(scored[i])
            if self.constraint is not None:
                self.constraint.advance(token)
            if eos or not await self.on_token(token) or (
                    self.constraint is not None and self.constraint.finished):
                self.stats.finish_reason = "stop"
                self.finished = True
                return
            if self.stats.completion_tokens >= self.params.max_tokens:
                self.finished = True
                return

    async def close(self) -> None:
        """A clean end pools the session for the next request, with the tokens (and the
        features) its caches hold; any other end closes it."""
        session = self.session
        if session is None:
            return
        with trio.CancelScope(shield=True):
            if self.finished:
                session.cached = tuple(self.history[:self.kv])
                session.features = (torch.cat(self.collected)[:self.kv] if self.collected
                                    else self.inherited)
                await self.generator.pipeline.release(session)
                self.generator.audits.after(session.route, self.history, self.kept)
            else:
                await session.close()

    def _verify(self, hidden: torch.Tensor, pending: int, draft: TokenTree,
                draft_probs: torch.Tensor | None) -> tuple[TreeVerdict, list[TokenLogprob]]:
        """hidden [1, pending + nodes, H] from the pipeline -> what this round commits,
        and (when log-probabilities are asked for) the committed tokens' entries."""
        head = self.generator.head
        top = self.logprobs.top if self.logprobs is not None else None
        with torch.inference_mode():
            if self.mode == "sample":  # a chain: rejection sampling
                logits = head.logits(hidden[:, pending - 1:, :])[0]  # [γ+1, V]
                probs = torch.stack([distribution(row, self.params)
                                     for row in self._masked(logits)])  # [γ+1, V]
                chain = verify_sample(probs, draft.tokens, draft_probs, self.rng)
                verdict = TreeVerdict(list(range(chain.accepted)), chain.token)
                # committed token i was chosen at row i
                return verdict, [] if top is None else token_logprobs(
                    logits, verdict.committed(draft), top)

            # The root and the first chain of slots (the drafter's best guess) in one
            # lm_head call, which costs about what one row does; other nodes on demand.
            first = pending + draft.first_chain()
            rows = head.logits(hidden[:, pending - 1:first, :])[0]  # [1 + chain, V]
            choosing = self._masked(rows, draft.tokens)  # [1 + chain, V]
            scored: dict[int, torch.Tensor] = {}  # nodes off that chain, once each

            def logits_at(node: int) -> torch.Tensor:  # the target's logits after a node [V]
                if node + 1 < rows.shape[0]:
                    return choosing[node + 1]
                if node not in scored:
                    scored[node] = head.logits(
                        hidden[:, pending + node:pending + node + 1, :])[0, 0]
                return scored[node]

            verdict = verify_tree(draft, logits_at,
                                  self.classes if self.mode == "adaptive" else None)
            if top is None:
                return verdict, []
            # committed token i was chosen after the root (i = 0) or path node i - 1;
            # its log-probability is the model's own, before any mask
            chosen = torch.stack([rows[n + 1] if n + 1 < rows.shape[0] else logits_at(n)
                                  for n in (-1, *verdict.path)])  # [k + 1, V]
            return verdict, token_logprobs(chosen, verdict.committed(draft), top)

    def _masked(self, logits: torch.Tensor, chain: list[int] | tuple[()] = ()
                ) -> torch.Tensor:
        """logits [n, V] with the tokens the constraint refuses at -inf, row i under the
        state after chain[:i] (a constrained request's draft is a chain of forced
        tokens, which the constraint allows); as they are without a constraint."""
        if self.constraint is None:
            return logits
        remaining = self.params.max_tokens - self.stats.completion_tokens
        constraint = self.constraint
        masks = []
        for i in range(logits.shape[0]):
            if i:
                if i == 1:
                    constraint = constraint.fork()
                constraint.advance(chain[i - 1])
            masks.append(constraint.allowed_mask(remaining - i))  # [V'] bool
        mask = torch.stack(masks).to(logits.device)  # [n, V']
        size = logits.shape[-1]
        if mask.shape[1] < size:  # the head's rows past the tokenizer's: never allowed
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], size - mask.shape[1])], 1)
        return logits.masked_fill(~mask[:, :size], float("-inf"))  # [n, V]
