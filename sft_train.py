"""Supervised fine-tuning: teach a pretrained LilLM to chat, with the loss on assistant tokens only.

    python sft_train.py --init checkpoints/base                         # chat_{train,val}.jsonl from ../shared/data
    python sft_train.py --init checkpoints/base --lora_rank 8           # LoRA adapters, merged into the saved weights
    python sft_train.py --init checkpoints/base --resume                # continue an interrupted run exactly
    torchrun --standalone --nproc_per_node=2 sft_train.py --init checkpoints/base \\
        --dataset HuggingFaceTB/smoltalk --dataset_config all --val_split test

Writes a self-contained checkpoint folder (--out_dir): a plain LilLM (LoRA merged), its tokenizer, and meta.json
with "stage": "sft", the chat template version, the system prompt, the training arguments and a "summary" with
the held-out assistant loss before and after and the rate of sampled replies that end with <|im_end|>.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch

from lillm import cli
from lillm.chat import CHAT_TEMPLATE_VERSION, DEFAULT_SYSTEM_PROMPT, render
from lillm.checkpoint import (
    TRAINER_STATE_SCHEMA,
    CheckpointError,
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
from lillm.devices import enable_determinism, resolve_dtype, to_device
from lillm.flops import flops_per_token, peak_flops
from lillm.generate import SamplingConfig, generate_batch
from lillm.instruct import held_out_instructions, instruction_report, report_line
from lillm.lora import DEFAULT_TARGETS, apply_lora, lora_state_dict, merge_lora
from lillm.model import LilLM
from lillm.sharding import checkpoint_payload, idle_forwards, shard_model
from lillm.paths import default_data_file
from lillm.sft_data import (
    SFTDataset,
    Source,
    batch_indices,
    build_sft_dataset,
    collate,
    hub_conversations,
    read_jsonl_conversations,
)
from lillm.tokenizer import special_tokens
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
from lillm.word_unlikelihood import WordUnlikelihoodObjective


STATE_SCHEMA = {**TRAINER_STATE_SCHEMA, "train_conversations": int, "seed": int}  # what --resume reads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", type=Path, required=True, help="pretrained checkpoint folder (from pretrain.py)")
    p.add_argument("--out_dir", type=cli.output_dir, default=Path("checkpoints/sft"), help="checkpoint folder to write")
    p.add_argument("--log_dir", type=cli.output_dir, help="metrics folder (default: runs/<out_dir name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out_dir (same --init and data)")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint in --out_dir (refused otherwise)")
    data = p.add_argument_group("data")
    data.add_argument("--train_file", type=Path, help="chat jsonl (default: ../shared/data/chat_train.jsonl)")
    data.add_argument("--val_file", type=Path, help="held-out chat jsonl (default: ../shared/data/chat_val.jsonl)")
    data.add_argument("--dataset", help="a Hugging Face chat dataset instead of files (e.g. HuggingFaceTB/smoltalk)")
    data.add_argument("--dataset_config", help="its configuration (e.g. all)")
    data.add_argument("--split", default="train", help="--dataset split to train on")
    data.add_argument("--val_split", default="test", help="--dataset split to evaluate on")
    data.add_argument("--messages_field", default="messages", help="the field holding the list of messages")
    data.add_argument("--max_conversations", type=int, help="train on at most this many conversations")
    data.add_argument("--val_conversations", type=int, default=400, help="held-out conversations in each eval")
    data.add_argument("--max_seq_len", type=int, help="context for training (default and maximum: the model's)")
    data.add_argument("--overflow", choices=["truncate", "drop"], default="truncate",
                      help="conversations longer than the context: keep the leading turns that fit, or skip them")
    data.add_argument("--system", type=cli.text, default=DEFAULT_SYSTEM_PROMPT,
                      help="system message for conversations without one ('' for none); saved in meta.json")
    data.add_argument("--train_on_inputs", action="store_true", help="loss on every token, not only the assistant's")
    data.add_argument("--word_weight", type=float, default=1.0,
                      help="loss weight of the reply tokens that first use each word a story instruction asks for (README, "
                           "\"Story instructions\"); held-out loss stays unweighted")
    data.add_argument("--word_unlikelihood", type=float, default=0.0,
                      help="> 0: add this weight x -log(1 - p(word)) after each requested word's first use, where the reply "
                           "does not use it again (against word stuffing; needs --word_weight > 1)")
    train = p.add_argument_group("training")
    train.add_argument("--batch_size", type=int, default=16, help="conversations per micro-batch per process")
    train.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step per process")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    train.add_argument("--min_lr", type=float, default=1e-4, help="learning rate at the end of the cosine decay")
    train.add_argument("--warmup_steps", type=int, default=30)
    train.add_argument("--max_steps", type=int, default=300, help="optimizer steps")
    train.add_argument("--weight_decay", type=float, default=0.0)
    train.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    train.add_argument("--eval_interval", type=int, default=100)
    train.add_argument("--ckpt_interval", type=int, default=100)
    train.add_argument("--log_interval", type=int, default=10)
    train.add_argument("--seed", type=int, default=1337)
    train.add_argument("--device", type=cli.device, default="auto", help="auto (cuda > mps > cpu), cpu, cuda, ...")
    train.add_argument("--dtype", type=cli.dtype, default="auto", help="auto (bf16 where supported), fp32 or bf16")
    train.add_argument("--grad_checkpointing", action="store_true", help="recompute activations in backward")
    train.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer state over ranks (FSDP2)")
    train.add_argument("--deterministic", action="store_true",
                       help="deterministic CUDA kernels: bit-exact resumes on GPUs too, somewhat slower")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora_rank", type=int, default=0, help="> 0: train rank-r adapters instead of all weights")
    lora.add_argument("--lora_alpha", type=float, help="adapter scale numerator (default: 2 * rank)")
    lora.add_argument("--lora_targets", default=",".join(DEFAULT_TARGETS), help="comma-separated Linear names")
    sample = p.add_argument_group("end-of-run check")
    sample.add_argument("--eval_samples", type=int, default=20, help="held-out prompts to answer greedily (0: skip)")
    sample.add_argument("--sample_max_tokens", type=int, help="reply length budget (default: half the context, at most 128)")
    sample.add_argument("--instruct_eval", type=int, default=100,
                        help="score this many held-out story instructions of each kind, if the val data has them (0: skip)")
    sample.add_argument("--instruct_no_repeat_ngram", type=int, default=0,
                        help="score replies decoded without repeating an n-gram of their own (0: plain greedy)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    positive = ("batch_size", "grad_accum", "max_steps", "eval_interval", "ckpt_interval", "log_interval", "val_conversations")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("lora_rank", "eval_samples", "instruct_eval", "instruct_no_repeat_ngram"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not args.word_weight > 0 or args.word_weight == float("inf"):
        raise ValueError(f"--word_weight must be a positive number, got {args.word_weight}")
    if args.word_weight != 1.0 and args.train_on_inputs:
        raise ValueError("--word_weight has no effect with --train_on_inputs (every token weighs 1 there): drop one of them")
    if not 0 <= args.word_unlikelihood < float("inf"):
        raise ValueError(f"--word_unlikelihood must be a number >= 0, got {args.word_unlikelihood}")
    if args.word_unlikelihood and not args.word_weight > 1:
        raise ValueError("--word_unlikelihood finds the requested words by their --word_weight: give --word_weight > 1 too")
    if args.sample_max_tokens is not None and args.sample_max_tokens < 1:
        raise ValueError(f"--sample_max_tokens must be positive, got {args.sample_max_tokens}")
    if args.fsdp and args.lora_rank:
        raise ValueError("--fsdp with --lora_rank is not supported yet (LoRA needs no gradients or Adam state for the "
                         "frozen weights, so plain DDP usually fits): drop one of them")


def conversations(args: argparse.Namespace, split: str) -> Source:
    """The train or val conversations: --dataset, the given files, or the shared chat data."""
    if args.dataset:
        return hub_conversations(args.dataset, args.split if split == "train" else args.val_split,
                                 args.messages_field, args.dataset_config)
    path = args.train_file if split == "train" else args.val_file
    return read_jsonl_conversations(path or default_data_file(f"chat_{split}.jsonl"), args.messages_field)


def assistant_loss(model: LilLM, data: SFTDataset, info, batch_size: int) -> float:
    """Mean cross-entropy over every assistant token of the held-out set, token-weighted over all ranks.
    Conversations are batched by length, so little compute goes to padding."""
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))[info.rank :: info.world_size]
    total, count = 0.0, 0.0
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        x, y, mask = (t.to(info.device) for t in collate([data.ids[i] for i in rows], [data.masks[i] for i in rows], data.pad_id))
        n = mask.sum().item()
        total += model(x, y, loss_mask=mask)[1].item() * n
        count += n
    most = math.ceil(len(range(0, len(data), info.world_size)) / batch_size)  # rank 0 has the most batches
    idle_forwards(model, most - math.ceil(len(order) / batch_size), info.device)
    total, count = all_reduce_sum([total, count], info)
    return total / count


Prompt = tuple[str, list[int]]  # (the user's text, the rendered prompt ids)


def held_out_prompts(
    tokenizer, source: Source, n: int, max_new_tokens: int, max_seq_len: int, system: str | None
) -> list[Prompt]:
    """The first n held-out conversations' openings (their messages up to and including the first user turn,
    so a leading system message stays with it), rendered with the generation prompt, that leave max_new_tokens
    of room in the context: (user text, prompt ids)."""
    prompts = []
    for _, messages in source:
        if len(prompts) == n:
            break
        first_user = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"), None)
        if first_user is None:
            continue
        prompt = render(tokenizer, messages[: first_user + 1], add_generation_prompt=True, system=system)[0]
        if len(prompt) + max_new_tokens <= max_seq_len:
            prompts.append((messages[first_user]["content"], prompt))
    if not prompts:
        raise ValueError(
            f"no held-out prompt leaves room for a {max_new_tokens}-token reply in {max_seq_len} tokens; "
            "lower --sample_max_tokens"
        )
    return prompts


def im_end_rate(model: LilLM, tokenizer, prompts: list[Prompt], max_new_tokens: int) -> tuple[float, list[dict]]:
    """Fraction of greedy replies that end with <|im_end|> within max_new_tokens, and every reply."""
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, stop_ids=(special_tokens(tokenizer).im_end,))
    replies = generate_batch(model, [prompt for _, prompt in prompts], cfg)  # stop ids are cut off the replies
    # Every row that never stops gets exactly `budget` tokens: the reply budget, or less where the context window
    # ends first. Only a reply shorter than that stopped at <|im_end|>; one cut by the window did not end.
    budget = min(max_new_tokens, model.config.max_seq_len - max(len(prompt) for _, prompt in prompts))
    ended = [len(reply) < budget for reply in replies]
    examples = [{"user": user, "reply": tokenizer.decode(r), "ended": e} for (user, _), r, e in zip(prompts, replies, ended)]
    return sum(ended) / len(ended), examples


def trained_tokens(train: SFTDataset, args: argparse.Namespace, chunks: int, start_step: int) -> int:
    """Real (non-padding) input tokens of the steps this run made, over all ranks."""
    return sum(
        len(train.ids[i]) - 1
        for step in range(start_step, args.max_steps)
        for chunk in range(chunks)
        for i in batch_indices(len(train), args.batch_size, args.seed, step, chunk, chunks)
    )


@cli.error_boundary("sft_train.py")  # bad flags, data or checkpoint: one line, exit status 2
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
    if args.deterministic:
        enable_determinism()
    set_seed(args.seed)
    base = load_checkpoint(args.init, device=info.device)
    model, tokenizer, config = base.model, base.tokenizer, base.config
    tokenizer_path = base.directory / "tokenizer.json"
    seq_len = args.max_seq_len or config.max_seq_len
    if not 1 < seq_len <= config.max_seq_len:
        raise ValueError(f"--max_seq_len {seq_len} must be in 2..{config.max_seq_len} (the context of {args.init})")
    state = resumed = None
    if args.resume:  # everything the resume reads is checked before any data is read or any step is taken
        resume_dir = resolve(args.out_dir)  # DIR, or DIR.old if a save was cut off
        state = load_trainer_state(resume_dir, STATE_SCHEMA)
        if state["seed"] != args.seed:
            raise ValueError(f"{args.out_dir} was trained with --seed {state['seed']}; resume with the same seed")
        check_same_tokenizer(resume_dir, file_sha256(tokenizer_path), f"--init {args.init}")
        resumed = load_checkpoint(resume_dir, device=info.device)
        if resumed.config != config:
            raise CheckpointError(f"checkpoint {resume_dir} is not a fine-tune of --init {args.init} (model configs differ)")
    system = args.system or None
    reply_budget = args.sample_max_tokens or min(128, seq_len // 2)
    prompts = []  # chosen first, so a bad --sample_max_tokens fails before any work
    if args.eval_samples and info.is_main:
        prompts = held_out_prompts(tokenizer, conversations(args, "val"), args.eval_samples, reply_budget, seq_len, system)
    train = build_sft_dataset(tokenizer, conversations(args, "train"), seq_len, args.overflow, system,
                              args.max_conversations, args.word_weight)
    val = build_sft_dataset(tokenizer, conversations(args, "val"), seq_len, args.overflow, system, args.val_conversations)
    if info.is_main:
        print(f"train: {train.summary()}\nval:   {val.summary()}")

    dtype = resolve_dtype(args.dtype, info.device)
    with torch.no_grad(), autocast(info.device, dtype):  # the precision of every later eval (lillm.train.fit)
        before = assistant_loss(model, val, info, args.batch_size)  # the --init model, also when resuming
    if info.is_main:
        print(f"held-out assistant loss before SFT: {before:.4f} ({int(sum(m.sum() for m in val.masks)):,} tokens)")

    if args.lora_rank:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        trainable = apply_lora(model, args.lora_rank, args.lora_alpha or 2.0 * args.lora_rank, targets)
        if info.is_main:
            print(f"LoRA rank {args.lora_rank}: {trainable:,} trainable parameters of {model.num_parameters():,}")
    model.gradient_checkpointing = args.grad_checkpointing
    set_seed(args.seed, info.rank)  # LoRA's initial adapters are rank 0's everywhere; dropout differs between ranks

    start_step, optimizer_state = 0, None
    if state is not None:
        if state["train_conversations"] != len(train) or ("lora" in state) != bool(args.lora_rank):
            raise ValueError(f"{args.out_dir} was made with other data or LoRA settings; resume with the same flags")
        if args.lora_rank:  # the adapters; the frozen base comes from --init
            load_lora_adapters(model, state["lora"], resume_dir / "trainer_state.pt")
        else:
            model.load_state_dict(resumed.model.state_dict())
        check_optimizer_state(state["optimizer"], make_optimizer(model, args.lr, args.weight_decay), resume_dir / "trainer_state.pt")
        start_step, optimizer_state = state["step"], state["optimizer"]
        restore_rng_state(state["rng"], info)
        if start_step >= args.max_steps:
            raise ValueError(f"{args.out_dir} is already at step {start_step} >= --max_steps {args.max_steps}")

    if args.fsdp:
        shard_model(model, info.device, dtype)  # in place, after the --init (or resumed) weights are in
    chunks = info.world_size * args.grad_accum
    mean_len = sum(len(i) - 1 for i in train.ids) / len(train)
    tokens_per_step = round(mean_len * args.batch_size * chunks)  # expected real tokens; batches vary
    logger = RunLogger(args.log_dir or Path("runs") / args.out_dir.name, enabled=info.is_main, resume=args.resume)

    def get_batch(step: int, micro: int):
        rows = batch_indices(len(train), args.batch_size, args.seed, step, info.rank * args.grad_accum + micro, chunks)
        batch = collate([train.ids[i] for i in rows], [train.masks[i] for i in rows], train.pad_id, args.train_on_inputs)
        return tuple(to_device(t, info.device) for t in batch)

    def evaluate() -> dict[str, float]:
        return {"val_loss": assistant_loss(model, val, info, args.batch_size)}

    final_save: dict = {}  # the last save waits for the run's summary: one atomic write, never a rewrite after

    def save(step: int, optimizer, metrics: dict) -> None:
        weights, optimizer_state = checkpoint_payload(model, optimizer)  # FSDP gathers: every rank takes part
        rng = rng_state(info)  # every rank's streams, gathered: also a collective
        if not info.is_main:
            return
        plain = merge_lora(copy.deepcopy(model)) if args.lora_rank else weights
        state = {"step": step, "optimizer": optimizer_state, "rng": rng, "train_conversations": len(train),
                 "seed": args.seed}
        if args.lora_rank:
            state["lora"] = lora_state_dict(model)
        meta = {
            "stage": "sft",
            "chat_template_version": CHAT_TEMPLATE_VERSION,
            "system_prompt": system,
            "init": str(args.init),
            "step": step,
            "metrics": metrics,
            "data": {"train": train.summary(), "val": val.summary()},
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }
        if step == args.max_steps:
            final_save.update(model=plain, meta=meta, state=state)
            return
        save_checkpoint(args.out_dir, plain, tokenizer_path, meta=meta, trainer_state=state)

    if not args.resume:
        logger.log(0, val_loss=before)
    started = time.perf_counter()
    cfg = TrainConfig(
        max_steps=args.max_steps, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, grad_accum=args.grad_accum,
        eval_interval=args.eval_interval, ckpt_interval=args.ckpt_interval, log_interval=args.log_interval,
    )
    objective = WordUnlikelihoodObjective(model, args.word_unlikelihood) if args.word_unlikelihood else model
    metrics = fit(
        objective, info, cfg, get_batch, evaluate, save, logger, dtype, start_step=start_step,
        optimizer_state=optimizer_state, tokens_per_step=tokens_per_step,
        flops_per_token=flops_per_token(config, seq_len), peak_flops=peak_flops(info.device),
    )
    train_seconds = time.perf_counter() - started  # evals and saves included; tokens/s counts steps only
    plot = logger.close(title=f"SFT {args.out_dir.name}: " + ("all tokens" if args.train_on_inputs else "assistant tokens"))
    if not info.is_main:
        return

    plain = final_save["model"].to(info.device).eval()  # the weights the last save writes (LoRA merged): what the summary describes
    summary = {
        "val_loss_before": before,
        "val_loss": metrics["val_loss"],
        "val_assistant_tokens": int(sum(m.sum() for m in val.masks)),
        "train_seconds": train_seconds,
        "tokens_per_s": trained_tokens(train, args, chunks, start_step) / metrics["train_seconds"],
    }
    if prompts:
        rate, examples = im_end_rate(plain, tokenizer, prompts, reply_budget)
        summary.update(im_end_rate=rate, im_end_samples=len(examples), sample_max_tokens=reply_budget, examples=examples[:5])
    instructions = held_out_instructions((m for _, m in conversations(args, "val")), args.instruct_eval) if args.instruct_eval else {}
    if any(instructions.values()):  # the held-out data are story instructions (data/prepare_story_instructions.py)
        summary["instruct"] = instruction_report(plain, load_checkpoint(args.init, device=info.device).model,
                                                 tokenizer, instructions, system, args.instruct_no_repeat_ngram)
    meta = {**final_save["meta"], "summary": summary}
    save_checkpoint(args.out_dir, plain, tokenizer_path, meta=meta, trainer_state=final_save["state"])
    print(
        f"done in {train_seconds:.0f} s ({summary['tokens_per_s']:,.0f} tokens/s): held-out assistant loss "
        f"{before:.4f} -> {metrics['val_loss']:.4f}"
        + (f", replies ending with <|im_end|>: {rate:.0%} of {len(examples)}" if prompts else "")
        + f" -> {args.out_dir}" + (f" (curve: {plot})" if plot else "")
    )
    if "instruct" in summary:
        print(report_line(summary["instruct"]))


if __name__ == "__main__":
    main()
