"""`Samplers`: the sampler actors as one fault-tolerant handle. Each request's prompts are
split across the samplers that serve its arm; a sampler that dies is restarted by Ray and
caught up, one lost with its node is dropped, and its share is sampled again (rl/fleet.py
places and starts the actors).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from common.records import Group, Sampling
from rl.faults import Faults

log = logging.getLogger(__name__)


class Samplers:
    """The sampler actors as one: each request's prompts are split across the samplers that
    serve its arm (all of them, but for a sweep's full fine-tuning arms: sampler_kinds).

    A sampler that dies is restarted by Ray (rollout.max_restarts); the first call that
    notices waits for it (its engine starts again), has the learner bring it to the newest
    adapter, and samples its share again with the same seed. Both are counted. Without a
    learner (tests with stand-in samplers) a death is raised.

    A sampler whose node is gone (Ray declared the node dead: its link went down, the machine
    stopped) is dropped when the others serve every arm it served: the learner stops
    publishing to it, Ray stops restarting it, its share of the request is split across the
    others and sampled again, and the run goes on with fewer samplers (counted in
    fault/samplers_lost), and its placement group (one of its own: place_actors) is removed,
    so that Ray stops trying to re-place it. When it was the last to serve an arm, the call
    waits for Ray to restart it elsewhere (rollout.restart_timeout_s), as for any other death.
    """

    POLL_S = 1.0  # how often a wait for a restarting sampler checks whether its node is gone

    def __init__(self, actors: list, learner=None, restart_timeout_s: float = 600.0, faults: Faults | None = None):
        import ray

        self.actors, self.learner, self.restart_timeout_s = list(actors), learner, restart_timeout_s
        self.endpoints = ray.get([a.endpoint.remote() for a in self.actors]) if learner else []
        # The arms each serves (asked once; None: stand-in samplers, which serve every arm).
        self.serves = [set(arms) for arms in ray.get([a.arms.remote() for a in self.actors])] if learner else None
        self.nodes = ray.get([a.__ray_call__.remote(_node_id) for a in self.actors])  # where each runs now
        self.groups = ray.get([a.__ray_call__.remote(_own_group) for a in self.actors])  # None: shares one
        self.dropped: set[int] = set()  # lost with their node: no prompts, no adapters
        self.faults = faults or Faults()  # counts restarts, losses and groups sampled again
        self._lock = threading.Lock()  # the async producer and the main thread (eval, probe) both sample

    def __iter__(self):
        """The samplers in the fleet (not those dropped)."""
        return iter([a for i, a in enumerate(self.actors) if i not in self.dropped])

    def live(self) -> list[int]:
        """The indices of the samplers in the fleet (not those dropped)."""
        return [i for i in range(len(self.actors)) if i not in self.dropped]

    def serving(self, arm: str) -> list[int]:
        """The indices of the samplers that serve `arm`."""
        return [i for i in self.live() if self.serves is None or arm in self.serves[i]]

    def __len__(self):
        return len(self.actors)  # every index ever used, dropped ones included (indices stay put)

    def generate(self, prompt_ids_P: list[list[int]], sampling: Sampling) -> list[Group]:
        """One Group per prompt, in prompt order, not yet scored (its `row` is empty: the
        caller's). The j-th of the k samplers that serve the arm gets prompts j, j+k, ..., each
        with its own seed (common/records.py `Sampling`), so that what a prompt draws does not
        depend on how many samplers there are."""
        return self.generate_many([(prompt_ids_P, sampling)])[0]

    def generate_many(self, requests: list[tuple[list[list[int]], Sampling]]) -> list[list[Group]]:
        """generate for several requests (the arms of a sweep) at once: each sampler gets its
        share of every request in one call, which its engine batches together. A share lost
        with a dropped sampler is split across the others and sampled again."""
        import ray

        out = [[None] * len(prompts) for prompts, _ in requests]
        work = [(r, list(range(len(prompts))), sampling) for r, (prompts, sampling) in enumerate(requests)]
        while work:  # the first round: every prompt; later: the shares of samplers dropped meanwhile
            args = self._split(work, requests)  # sampler -> [(request, prompt positions, sampling)]
            sent_to = list(self.endpoints)  # which incarnation of each sampler got the request

            def call(i):
                return self.actors[i].generate_many.remote([([requests[r][0][k] for k in positions], s)
                                                            for r, positions, s in args[i]])

            refs, work = {i: call(i) for i in args}, []
            for i, ref in refs.items():
                while True:
                    try:
                        rollouts = ray.get(ref)
                        break
                    except ray.exceptions.RayActorError as e:
                        self.faults.resampled_groups += sum(len(positions) for _, positions, _ in args[i])
                        if not self.recover(i, sent_to[i] if self.learner else "", e):
                            rollouts = None  # dropped with its node: its share goes to the others
                            work += args[i]
                            break
                        sent_to[i] = self.endpoints[i]
                        ref = call(i)  # the same prompts and seeds
                for (r, positions, _), res in zip(args[i], rollouts or []):
                    for k, completions in zip(positions, res.completions_P_G):
                        out[r][k] = Group({}, completions, res.version, res.digest, arm=res.arm)
        return out

    def _split(self, work: list[tuple[int, list[int], Sampling]], requests: list) -> dict[int, list]:
        """Each request's prompts (positions) across the samplers that serve its arm: the j-th
        of k gets positions j, j+k, ..., each prompt with the seed the whole request gives it;
        non-empty shares only."""
        args: dict[int, list] = {}
        for r, positions, _ in work:
            prompts, sampling = requests[r]
            seeds = sampling.prompt_seeds(len(prompts))
            pool = self.serving(sampling.arm)
            if positions and not pool:
                raise RuntimeError(f"no sampler serves arm {sampling.arm!r}")
            for j, i in enumerate(pool):
                share = positions[j::len(pool)]
                if share:
                    seeded = sampling if seeds[0] is None else dataclasses.replace(
                        sampling, seed=None, seeds=tuple(seeds[k] for k in share))
                    args.setdefault(i, []).append((r, share, seeded))
        return args

    def recover(self, i: int, lost_endpoint: str, error: BaseException | None = None) -> bool:
        """Wait for Ray to restart sampler i (which served at `lost_endpoint`), then bring it
        to the learner's newest adapter: True. False when it was dropped instead (its node is
        gone and the others serve its arms): the caller hands its work to the others."""
        import ray

        if self.learner is None:
            raise error or RuntimeError(f"sampler-{i} died")
        with self._lock:
            if i in self.dropped:
                return False
            if self.endpoints[i] != lost_endpoint:
                return True  # another caller (the async producer, an evaluation, a publish) brought it back
            deadline = time.monotonic() + self.restart_timeout_s
            ping = self.actors[i].endpoint.remote()
            while True:  # until the restarted actor's constructor (the engine start) has run
                ready, _ = ray.wait([ping], timeout=self.POLL_S)
                if ready:
                    try:
                        endpoint = ray.get(ping)
                        break
                    except ray.exceptions.ActorUnavailableError:  # restarting: ask again
                        time.sleep(self.POLL_S)
                        ping = self.actors[i].endpoint.remote()
                    except ray.exceptions.RayActorError as e:
                        if self._may_drop(i):
                            self._drop(i, lost_endpoint)
                            return False
                        raise RuntimeError(f"sampler-{i} died and Ray will not restart it (rollout.max_restarts "
                                           "used up, or its node is gone and no other sampler serves its arms)") from e
                elif self._may_drop(i):
                    self._drop(i, lost_endpoint)
                    return False
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sampler-{i} did not come back within rollout.restart_timeout_s="
                                       f"{self.restart_timeout_s:g}") from error
            if endpoint == lost_endpoint:
                raise RuntimeError(f"sampler-{i} is alive but failed to sample or to acknowledge the adapter within "
                                   "sync.ack_timeout_s") from error
            ray.get(self.learner.disconnect.remote(lost_endpoint))
            ray.get(self.learner.catch_up.remote(endpoint, sorted(self.serves[i]) if self.serves else None))
            self.endpoints[i] = endpoint
            self.nodes[i] = ray.get(self.actors[i].__ray_call__.remote(_node_id))  # Ray may restart it elsewhere
            self.faults.sampler_restarts += 1
            log.warning("sampler-%d died; Ray restarted it and it serves the learner's newest adapter again "
                        "(%d restarts in this run so far)", i, self.faults.sampler_restarts)
            return True

    def node_gone(self, i: int) -> bool:
        """Whether Ray has declared sampler i's node dead (or no longer knows it)."""
        import ray

        alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
        return not alive.get(self.nodes[i], False)

    def _may_drop(self, i: int) -> bool:
        """Sampler i's node is gone and the other samplers serve every arm it served."""
        others = [j for j in self.live() if j != i]
        covered = all(any(arm in self.serves[j] for j in others) for arm in self.serves[i]) if self.serves else others
        return bool(others) and bool(covered) and self.node_gone(i)

    def _drop(self, i: int, endpoint: str):
        """Take sampler i out of the fleet: the learner stops publishing to it, Ray stops
        restarting it (its node is gone; a restart would wait for resources that left with it)."""
        import ray

        self.dropped.add(i)
        ray.get(self.learner.disconnect.remote(endpoint))
        try:
            ray.kill(self.actors[i], no_restart=True)
        except Exception:  # already gone from Ray's tables
            pass
        if self.groups[i]:
            from ray.util.placement_group import PlacementGroup, remove_placement_group

            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(self.groups[i])))
        self.faults.samplers_lost += 1
        log.warning("sampler-%d was lost with its node %s (Ray declared the node dead); the run goes on with %d "
                    "sampler(s), which sample its prompts again (%d sampler(s) lost in this run so far)",
                    i, self.nodes[i], len(self.live()), self.faults.samplers_lost)

    def recover_missing(self, missing: tuple[str, ...]):
        """After a publish: restart-and-catch-up each sampler that did not acknowledge it (or
        drop it, with its node gone)."""
        for endpoint in missing:
            if endpoint in self.endpoints:
                self.recover(self.endpoints.index(endpoint), endpoint)


def _node_id(actor) -> str:
    """The id of the node an actor runs on (called inside it through __ray_call__)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def _own_group(actor) -> str | None:
    """The id of the placement group an actor runs in when it holds that group alone (one
    bundle: a sampler's, place_actors), else None (called inside it through __ray_call__)."""
    import ray

    group = ray.util.get_current_placement_group()
    return group.id.hex() if group is not None and len(group.bundle_specs) == 1 else None
