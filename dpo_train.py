"""Preference tuning with DPO: make a chat model prefer the replies people chose over the ones they rejected.

    python dpo_train.py --init checkpoints/sft                                # prefs_{train,val}.jsonl from ../shared/data
    python dpo_train.py --init checkpoints/smollm2-135m-instruct --lora_rank 8
    python dpo_train.py --init checkpoints/sft --resume                       # continue an interrupted run exactly
    torchrun --standalone --nproc_per_node=2 dpo_train.py --init checkpoints/sft

The policy starts as --init and the frozen reference is --init too; the reference's log-probs of every pair
the run will see are computed once, before training. Writes a self-contained checkpoint folder (--out_dir): a
plain LilLM (LoRA merged), its tokenizer, and meta.json with "stage": "dpo" and a "summary": held-out reward
accuracy after training, the share of held-out pairs where the model's own length-normalised log-likelihood
prefers the chosen reply before and after, and greedy replies to a few held-out prompts before and after.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lillm import cli
from lillm.chat import CHAT_TEMPLATE_VERSION, render
from lillm.checkpoint import (
    TRAINER_STATE_SCHEMA,
    check_optimizer_state,
    check_out_dir,
    check_same_tokenizer,
    load_checkpoint,
    load_lora_adapters,
    load_trainer_state,
    resolve,
    save_checkpoint,
)
from lillm.data import file_sha256
from lillm.dpo import (
    DPOObjective,
    PreferenceData,
    build_preference_data,
    collate_pairs,
    pair_logps,
    preference_metrics,
    read_preference_pairs,
)
from lillm.fileio import atomic_write_text
from lillm.flops import flops_per_token, peak_flops
from lillm.devices import resolve_dtype
from lillm.generate import SamplingConfig, checkpoint_system_prompt, generate_batch
from lillm.lora import DEFAULT_TARGETS, apply_lora, lora_state_dict, merge_lora
from lillm.model import LilLM
from lillm.sharding import checkpoint_payload, idle_forwards, shard_model
from lillm.paths import default_data_file
from lillm.sft_data import batch_indices
from lillm.train import (
    RunLogger,
    TrainConfig,
    all_reduce_sum,
    autocast,
    cleanup_distributed,
    fit,
    make_optimizer,
    restore_rng_state,
    rng_state,
    set_seed,
    setup_distributed,
)


STATE_SCHEMA = {**TRAINER_STATE_SCHEMA, "train_pairs": int, "beta": float, "seed": int}  # what --resume reads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", type=Path, required=True, help="chat checkpoint folder (SFT or imported); also the reference")
    p.add_argument("--out_dir", type=cli.output_dir, default=Path("checkpoints/dpo"), help="checkpoint folder to write")
    p.add_argument("--log_dir", type=cli.output_dir, help="metrics folder (default: runs/<out_dir name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out_dir (same --init and data)")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint in --out_dir (refused otherwise)")
    data = p.add_argument_group("data")
    data.add_argument("--train_file", type=Path, help="preference jsonl (default: ../shared/data/prefs_train.jsonl)")
    data.add_argument("--val_file", type=Path, help="held-out pairs (default: ../shared/data/prefs_val.jsonl)")
    data.add_argument("--max_pairs", type=int, help="read at most this many training pairs")
    data.add_argument("--val_pairs", type=int, default=150, help="read the first N held-out pairs for every eval")
    data.add_argument("--max_seq_len", type=int, help="tokens per conversation (default and maximum: the model's context)")
    data.add_argument("--overflow", choices=["truncate", "drop"], default="truncate",
                      help="pairs longer than --max_seq_len: drop the prompt's oldest turns, or skip the pair")
    data.add_argument("--system", type=cli.text, help="system message ('' for none; default: the one --init was tuned with)")
    train = p.add_argument_group("training")
    train.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference")
    train.add_argument("--batch_size", type=int, default=4, help="pairs per micro-batch per process")
    train.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step per process")
    train.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    train.add_argument("--min_lr", type=float, default=1e-5, help="learning rate at the end of the cosine decay")
    train.add_argument("--warmup_steps", type=int, default=10)
    train.add_argument("--max_steps", type=int, default=200, help="optimizer steps")
    train.add_argument("--weight_decay", type=float, default=0.0)
    train.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    train.add_argument("--eval_interval", type=int, default=100, help="steps between held-out evaluations")
    train.add_argument("--ckpt_interval", type=int, default=100)
    train.add_argument("--log_interval", type=int, default=10)
    train.add_argument("--seed", type=int, default=1337)
    train.add_argument("--device", type=cli.device, default="auto", help="auto (cuda > mps > cpu), cpu, cuda, ...")
    train.add_argument("--dtype", type=cli.dtype, default="auto", help="auto (bf16 where supported), fp32 or bf16")
    train.add_argument("--grad_checkpointing", action="store_true", help="recompute activations in backward")
    train.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer state over ranks (FSDP2)")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora_rank", type=int, default=0, help="> 0: train rank-r adapters instead of all weights")
    lora.add_argument("--lora_alpha", type=float, help="adapter scale numerator (default: 2 * rank)")
    lora.add_argument("--lora_targets", default=",".join(DEFAULT_TARGETS), help="comma-separated Linear names")
    lora.add_argument("--lora_layers", type=int, default=0,
                      help="adapt only the last N blocks (0: all); backward then stops below them, which is faster")
    sample = p.add_argument_group("replies before and after")
    sample.add_argument("--eval_samples", type=int, default=3, help="held-out single-turn prompts to answer greedily")
    sample.add_argument("--sample_max_tokens", type=int, default=96, help="reply length budget")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    positive = ("batch_size", "grad_accum", "max_steps", "eval_interval", "ckpt_interval", "log_interval",
                "val_pairs", "sample_max_tokens")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("lora_rank", "lora_layers", "eval_samples", "warmup_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.beta <= 0:
        raise ValueError(f"--beta must be positive, got {args.beta}")
    if args.max_pairs is not None and args.max_pairs < 1:
        raise ValueError(f"--max_pairs must be positive, got {args.max_pairs}")
    if args.fsdp and args.lora_rank:
        raise ValueError("--fsdp with --lora_rank is not supported yet (LoRA needs no gradients or Adam state for the "
                         "frozen weights, so plain DDP usually fits): drop one of them")


def pairs_file(args: argparse.Namespace, split: str) -> Path:
    path = args.train_file if split == "train" else args.val_file
    return path or default_data_file(f"prefs_{split}.jsonl")


def held_out_logps(model: LilLM, data: PreferenceData, info, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2) log-probs of every held-out (chosen, rejected) and their reply token counts, over all ranks.
    Pairs are batched by length (little padding) in the same batches every time, so the reference and the
    policy at step 0 give identical numbers."""
    order = sorted(range(len(data)), key=data.length)[info.rank :: info.world_size]
    logps, counts = torch.zeros(len(data), 2, dtype=torch.float64), torch.zeros(len(data), 2, dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        logps[rows], counts[rows] = pair_logps(model, data, rows, info.device)
    most = -(-len(range(0, len(data), info.world_size)) // batch_size)  # batches of rank 0, which has the most
    idle_forwards(model, most - -(-len(order) // batch_size), info.device)
    flat = all_reduce_sum(torch.cat([logps, counts]).flatten().tolist(), info)  # rows other ranks left at 0
    both = torch.tensor(flat, dtype=torch.float64).view(2 * len(data), 2)
    return both[: len(data)], both[len(data) :]


def micro_rows(args: argparse.Namespace, n_train: int, info, step: int, micro: int) -> list[int]:
    """This rank's pairs of micro-step `micro` of `step` (a pure function, so resume and DDP see what one
    uninterrupted process sees)."""
    chunks = info.world_size * args.grad_accum
    return batch_indices(n_train, args.batch_size, args.seed, step, info.rank * args.grad_accum + micro, chunks)


Prompt = tuple[str, list[int]]  # (the user's text, the rendered prompt ids)


def sample_prompts(tokenizer, path: Path, n: int, max_new_tokens: int, max_seq_len: int, system: str | None) -> list[Prompt]:
    """The first n held-out single-turn prompts that leave max_new_tokens of room: short enough to read."""
    prompts = []
    for _, prompt, _, _ in read_preference_pairs(path):
        if len(prompts) == n:
            break
        ids = render(tokenizer, prompt, add_generation_prompt=True, system=system)[0]
        if len(prompt) == 1 and len(ids) + max_new_tokens <= max_seq_len:
            prompts.append((prompt[0]["content"], ids))
    return prompts


def greedy_replies(model: LilLM, tokenizer, prompts: list[Prompt], max_new_tokens: int) -> list[str]:
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens).with_stops(tokenizer)
    return [tokenizer.decode(reply) for reply in generate_batch(model, [ids for _, ids in prompts], cfg)]


def plot_reward_accuracy(rows: list[dict], path: Path, title: str) -> None:
    """Train (since the previous eval) and held-out reward accuracy against step, next to loss.png."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("train_reward_accuracy", "val_reward_accuracy", "val_ll_prefers_chosen"):
        points = [(r["step"], r[name]) for r in rows if name in r]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="step", ylabel="share of pairs", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


@cli.error_boundary("dpo_train.py")  # bad flags, data or checkpoint: one line, exit status 2
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = setup_distributed(args.device)
    try:
        run(args, info)
    finally:
        cleanup_distributed()


def run(args: argparse.Namespace, info) -> None:
    check_args(args)
    check_out_dir(args.out_dir, args.resume, args.overwrite)
    set_seed(args.seed)
    base = load_checkpoint(args.init, device=info.device)
    model, tokenizer, config = base.model, base.tokenizer, base.config
    seq_len = args.max_seq_len or config.max_seq_len
    if not 1 < seq_len <= config.max_seq_len:
        raise ValueError(f"--max_seq_len {seq_len} must be in 2..{config.max_seq_len} (the context of {args.init})")
    state = resumed = None
    if args.resume:  # everything the resume reads is checked before any data is read
        resume_dir = resolve(args.out_dir)  # DIR, or DIR.old if a save was cut off
        state = load_trainer_state(resume_dir, STATE_SCHEMA)
        if state["seed"] != args.seed:
            raise ValueError(f"{args.out_dir} was trained with --seed {state['seed']}; resume with the same seed")
        check_same_tokenizer(resume_dir, file_sha256(base.directory / "tokenizer.json"), f"--init {args.init}")
        resumed = load_checkpoint(resume_dir, device=info.device)
        if resumed.config != config:
            raise ValueError(f"checkpoint {resume_dir} is not a fine-tune of --init {args.init} (model configs differ)")
    system = checkpoint_system_prompt(base.meta) if args.system is None else (args.system or None)
    train = build_preference_data(tokenizer, read_preference_pairs(pairs_file(args, "train")), seq_len,
                                  args.overflow, system, args.max_pairs)
    val = build_preference_data(tokenizer, read_preference_pairs(pairs_file(args, "val")), seq_len,
                                args.overflow, system, args.val_pairs)
    prompts = sample_prompts(tokenizer, pairs_file(args, "val"), args.eval_samples, args.sample_max_tokens,
                             seq_len, system) if info.is_main else []
    if info.is_main:
        print(f"train: {train.summary()}\nval:   {val.summary()}")

    start_step = 0
    if state is not None:
        same = (state["train_pairs"], state["beta"], "lora" in state) == (len(train), args.beta, bool(args.lora_rank))
        if not same:
            raise ValueError(f"{args.out_dir} was made with other data, --beta or LoRA settings; resume with the same flags")
        start_step = state["step"]
        if start_step >= args.max_steps:
            raise ValueError(f"{args.out_dir} is already at step {start_step} >= --max_steps {args.max_steps}")

    # The reference is --init itself: everything it has to say is computed now, before the policy moves.
    dtype = resolve_dtype(args.dtype, info.device)
    started = time.perf_counter()
    micro_steps = [(step, micro) for step in range(start_step, args.max_steps) for micro in range(args.grad_accum)]
    with autocast(info.device, dtype):
        val_reference, val_counts = held_out_logps(model, val, info, args.batch_size)
        reference = {
            key: pair_logps(model, train, micro_rows(args, len(train), info, *key), info.device)[0]
            for key in tqdm(micro_steps, desc="reference log-probs", disable=not info.is_main, dynamic_ncols=True)
        }
    before = preference_metrics(val_reference, val_reference, val_counts, args.beta)
    replies_before = greedy_replies(model, tokenizer, prompts, args.sample_max_tokens) if prompts else []
    reference_seconds = time.perf_counter() - started
    if info.is_main:
        print(f"reference log-probs of {len(reference) * args.batch_size * info.world_size} training and {len(val)} "
              f"held-out pairs in {reference_seconds:.0f} s; held-out pairs where the model's length-normalised "
              f"log-likelihood prefers chosen: {before['ll_prefers_chosen']:.1%}")

    if args.lora_rank:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        model.requires_grad_(False)
        adapted = model.layers[-args.lora_layers :] if args.lora_layers else model
        trainable = apply_lora(adapted, args.lora_rank, args.lora_alpha or 2.0 * args.lora_rank, targets)
        if info.is_main:
            print(f"LoRA rank {args.lora_rank}: {trainable:,} trainable parameters of {model.num_parameters():,}")
    model.gradient_checkpointing = args.grad_checkpointing
    optimizer_state = None
    if state is not None:
        if args.lora_rank:
            load_lora_adapters(model, state["lora"], resume_dir / "trainer_state.pt")  # the frozen base is --init
        else:
            model.load_state_dict(resumed.model.state_dict())
        check_optimizer_state(state["optimizer"], make_optimizer(model, args.lr, args.weight_decay), resume_dir / "trainer_state.pt")
        optimizer_state = state["optimizer"]
        restore_rng_state(state["rng"], info)

    if args.fsdp:
        shard_model(model, info.device, dtype)  # in place, after the reference pass and the resumed weights
    objective = DPOObjective(model, args.beta)
    chunks = info.world_size * args.grad_accum
    pair_tokens = [len(c) + len(r) - 2 for c, r in zip(train.chosen, train.rejected)]
    tokens_per_step = round(sum(pair_tokens) / len(train) * args.batch_size * chunks)  # expected real tokens
    logger = RunLogger(args.log_dir or Path("runs") / args.out_dir.name, enabled=info.is_main, resume=args.resume)

    def get_batch(step: int, micro: int):
        ids, reply_mask = collate_pairs(train, micro_rows(args, len(train), info, step, micro))
        return ids.to(info.device), reference[(step, micro)].to(info.device, torch.float32), reply_mask.to(info.device)

    def evaluate() -> dict[str, float]:
        *sums, n = all_reduce_sum(objective.take_stats(), info)
        metrics = {f"train_{name}": s / max(n, 1) for name, s in zip(DPOObjective.STATS, sums)}
        logps, counts = held_out_logps(model, val, info, args.batch_size)
        metrics.update({f"val_{k}": v for k, v in preference_metrics(logps, val_reference, counts, args.beta).items()})
        if info.is_main:
            tqdm.write(f"reward accuracy: train {metrics['train_reward_accuracy']:.1%} (since the last eval), held-out "
                       f"{metrics['val_reward_accuracy']:.1%}; held-out margin {metrics['val_margin']:+.3f}, "
                       f"log-likelihood prefers chosen {metrics['val_ll_prefers_chosen']:.1%}")
        return metrics

    def save(step: int, optimizer, metrics: dict) -> None:
        weights, optimizer_state = checkpoint_payload(model, optimizer)  # FSDP gathers: every rank takes part
        rng = rng_state(info)  # every rank's streams, gathered: also a collective
        if not info.is_main:
            return
        plain = merge_lora(copy.deepcopy(model)) if args.lora_rank else weights
        state = {"step": step, "optimizer": optimizer_state, "rng": rng, "train_pairs": len(train),
                 "beta": args.beta, "seed": args.seed}
        if args.lora_rank:
            state["lora"] = lora_state_dict(model)
        meta = {
            "stage": "dpo",
            "chat_template_version": CHAT_TEMPLATE_VERSION,
            "system_prompt": system,
            "init": str(args.init),
            "step": step,
            "metrics": metrics,
            "data": {"train": train.summary(), "val": val.summary()},
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }
        save_checkpoint(args.out_dir, plain, base.directory / "tokenizer.json", meta, state)

    cfg = TrainConfig(
        max_steps=args.max_steps, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, grad_accum=args.grad_accum,
        eval_interval=args.eval_interval, ckpt_interval=args.ckpt_interval, log_interval=args.log_interval,
    )
    started = time.perf_counter()
    metrics = fit(
        objective, info, cfg, get_batch, evaluate, save, logger, dtype, start_step=start_step,
        optimizer_state=optimizer_state, tokens_per_step=tokens_per_step,
        flops_per_token=flops_per_token(config, seq_len), peak_flops=peak_flops(info.device),
    )
    train_seconds = time.perf_counter() - started  # evals and saves included
    plot = logger.close(title=f"DPO {args.out_dir.name} (beta {args.beta})")
    if plot:
        plot_reward_accuracy(logger.rows, plot.with_name("reward_accuracy.png"), f"DPO {args.out_dir.name}")
    if not info.is_main:
        return

    final = load_checkpoint(args.out_dir, device=info.device)  # the saved weights (LoRA merged)
    seen = [i for step in range(start_step, args.max_steps) for chunk in range(chunks)
            for i in batch_indices(len(train), args.batch_size, args.seed, step, chunk, chunks)]
    summary = {
        "val_pairs": len(val),
        "val_reward_accuracy": metrics["val_reward_accuracy"],
        "val_margin": metrics["val_margin"],
        "val_loss": metrics["val_loss"],
        "val_ll_prefers_chosen_before": before["ll_prefers_chosen"],
        "val_ll_prefers_chosen": metrics["val_ll_prefers_chosen"],
        "train_pairs_seen": len(seen),
        "reference_seconds": reference_seconds,
        "train_seconds": train_seconds,
        "tokens_per_s": sum(pair_tokens[i] for i in seen) / train_seconds,
    }
    if prompts:
        after = greedy_replies(final.model, tokenizer, prompts, args.sample_max_tokens)
        summary["examples"] = [{"user": user, "before": b, "after": a} for (user, _), b, a in zip(prompts, replies_before, after)]
    atomic_write_text(final.directory / "meta.json", json.dumps({**final.meta, "summary": summary}, indent=2) + "\n")
    print(
        f"done in {train_seconds:.0f} s ({summary['tokens_per_s']:,.0f} tokens/s): held-out reward accuracy "
        f"{metrics['val_reward_accuracy']:.1%} of {len(val)} pairs; length-normalised log-likelihood prefers chosen "
        f"{before['ll_prefers_chosen']:.1%} -> {metrics['val_ll_prefers_chosen']:.1%} -> {args.out_dir}"
        + (f" (curve: {plot})" if plot else "")
    )


if __name__ == "__main__":
    main()
