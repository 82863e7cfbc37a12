"""`rlhf-ray compare-data`: sample K responses per prompt from sft/ with vLLM on Ray, then rank them.

The prompts are split over `compare.num_engines` vLLM engines (Ray actors, reserved together in
one placement group); each prompt is sampled K times with its own seeds. Identical and empty
samples are dropped; a prompt left with fewer than 2 distinct responses has nothing to rank and
is left out (and counted). Sampling happens once per run: the candidates file is then fixed, so
rankings collected over days refer to the same responses.

Then a labeler function ranks every candidate at once, or (labeler 'human') people rank them on
the ranking page, which `rlhf-ray compare-data` serves until every prompt is ranked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray import cluster
from rlhf_ray.cluster import ACTOR_ENV
from rlhf_ray.compare.labelers import checked_scores, load_labeler, ranked_by_scores
from rlhf_ray.compare.store import Candidate, ComparisonStore
from rlhf_ray.config import CompareConfig, RunConfig
from rlhf_ray.data.readers import read_many
from rlhf_ray.data.records import PromptRecord
from rlhf_ray.modeling import check_model_folder, model_max_len
from rlhf_ray.plan import check_fits_here
from rlhf_ray.run import RunFolder
from rlhf_ray.tokenizer import load_tokenizer, render_prompts

Log = Callable[[str], None]


def compare_settings(cfg: RunConfig) -> CompareConfig:
    if cfg.compare is None:
        raise ValueError("no `compare` section in the config: add one (e.g. compare: {labeler: "
                         "human}) to collect comparisons")
    return cfg.compare


def store_of(cfg: RunConfig) -> ComparisonStore:
    return ComparisonStore(RunFolder(cfg.run_dir).compare, compare_settings(cfg).lease_s)


def prompt_files(cfg: RunConfig) -> list[Path]:
    files = list(compare_settings(cfg).prompts)
    if not files and cfg.data.demo is not None:
        files = [RunFolder(cfg.run_dir).demo_file("compare")]
    if not files:
        raise ValueError("compare.prompts: no prompt files (set compare.prompts, or data.demo)")
    return files


def read_prompts(cfg: RunConfig) -> list[PromptRecord]:
    files = prompt_files(cfg)
    records = read_many(files, PromptRecord)
    if not records:
        raise ValueError(f"{', '.join(map(str, files))}: no prompts to sample responses for")
    limit = compare_settings(cfg).max_prompts
    return records[:limit] if limit else records


def sample_candidates(cfg: RunConfig, prompts: list[PromptRecord], log: Log) -> list[Candidate]:
    """K distinct responses per prompt from sft/, sampled on `num_engines` vLLM actors."""
    from rlhf_ray.rl.rollout import RolloutActor  # vLLM is imported only where it is needed

    settings = compare_settings(cfg)
    sft = RunFolder(cfg.run_dir).output("sft")
    check_model_folder(sft)
    tokenizer = load_tokenizer(sft)
    max_len = model_max_len(sft)
    encoded = render_prompts(prompts, tokenizer, settings.max_new_tokens, max_len,
                             "compare.max_new_tokens")
    k, engines = settings.samples_per_prompt, settings.num_engines
    if not cluster.joins_cluster(cfg.cluster):
        check_fits_here(cfg, "compare", sft, max(map(len, encoded)))
    engine = cluster.bundle(settings.engine.num_cpus, settings.engine.num_gpus)
    # Each prompt K times, dealt round-robin over the engines; sample j of prompt i has seed
    # cfg.seed + i*K + j, so the draw does not depend on the number of engines.
    jobs = [(i, j) for i in range(len(prompts)) for j in range(k)]
    shares = [jobs[e::engines] for e in range(engines)]
    group = cluster.reserve(f"{engines} sampling engine(s)", [engine] * engines, "PACK", 600.0, log)
    try:
        actors = [RolloutActor.options(
            num_cpus=settings.engine.num_cpus, num_gpus=settings.engine.num_gpus,
            runtime_env=ACTOR_ENV,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=i),
        ).remote(sft, max_model_len=max(map(len, encoded)) + settings.max_new_tokens,
                 sequences=len(shares[i]), kv_cache=settings.kv_cache,
                 seed=cfg.seed, role=f"sampling engine {i}") for i in range(engines)]
        futures = [actor.generate.remote(
            [encoded[i] for i, _ in share], settings.max_new_tokens, settings.temperature,
            settings.top_p, expected_version=0, seeds=[cfg.seed + i * k + j for i, j in share])
            for actor, share in zip(actors, shares)]
        samples: list[list[str]] = [[] for _ in prompts]
        for share, rollouts in zip(shares, ray.get(futures)):
            for (i, _), rollout in zip(share, rollouts):
                ids = [t for t in rollout.response_ids if t not in tokenizer.stop_ids]
                samples[i].append(tokenizer.decode(ids).strip())
        for actor in actors:
            ray.get(actor.shutdown.remote())
    finally:
        remove_placement_group(group)
    candidates = []
    for i, (record, texts) in enumerate(zip(prompts, samples)):
        distinct = list(dict.fromkeys(t for t in texts if t))
        if len(distinct) >= 2:
            candidates.append(Candidate(id=f"p{i:05d}", prompt=record.prompt, responses=distinct,
                                        ground_truth=record.ground_truth))
    if not candidates:
        raise ValueError(f"all {len(prompts)} prompts got fewer than 2 distinct responses from "
                         f"{k} samples; raise compare.temperature or compare.samples_per_prompt")
    left_out = len(prompts) - len(candidates)
    log(f"sampled {k} responses for each of {len(prompts)} prompts; {len(candidates)} prompts "
        f"have 2+ distinct responses" + (f" ({left_out} left out: fewer than 2 distinct)"
                                          if left_out else ""))
    return candidates


def label_all(store: ComparisonStore, labeler_spec: str, log: Log) -> int:
    """Rank every unranked candidate with the labeler function; returns how many were added."""
    labeler = load_labeler(labeler_spec)
    ranked = {r["id"] for r in store.rankings()}
    added = ties = 0
    for candidate in store.candidates().values():
        if candidate.id in ranked:
            continue
        prompt = [m.model_dump() for m in candidate.prompt]
        scores = checked_scores(labeler(prompt, list(candidate.responses), candidate.ground_truth),
                                len(candidate.responses), labeler_spec)
        best_first = ranked_by_scores(list(candidate.responses), scores)
        if len(best_first) < 2:
            ties += 1
            continue
        store.append(candidate, best_first, labeler=f"labeler:{labeler_spec}")
        added += 1
    log(f"labeler {labeler_spec} ranked {added} prompts" +
        (f"; {ties} left unranked (all responses scored equal)" if ties else ""))
    return added


def collect_comparisons(cfg: RunConfig, log: Log) -> ComparisonStore:
    """Sample the candidates (once per run), then rank them with the configured labeler function.
    With labeler 'human' this only samples: people rank on the ranking page."""
    settings = compare_settings(cfg)
    if settings.labeler != "human":
        load_labeler(settings.labeler)  # an unknown labeler is refused before any sampling
    store = store_of(cfg)
    if store.has_candidates():
        log(f"{store.candidates_path} exists, sampling skipped")
    else:
        prompts = read_prompts(cfg)
        cluster.connect(cfg.cluster)
        store.write_candidates(sample_candidates(cfg, prompts, log))
    if settings.labeler != "human":
        label_all(store, settings.labeler, log)
    progress = store.progress()
    log(f"{progress['ranked']} of {progress['total']} prompts ranked -> {store.rankings_path}")
    return store
