"""The on-policy command on a real chat model: `python benchmarks/onpolicy_smollm2.py [--prompts 6] [--out DIR]`.

The policy is SmolLM2-135M-Instruct (configs/smollm2_hh.py: ChatML, its real tokenizer and `<|im_end|>` EOS) and
the prompts are the first held-out HH-RLHF conversations (multi-turn message lists). The reward model is
SmolLM2's backbone with a random score head (seed 0; no real reward model ships offline), so its preferences
mean nothing: this checks the real-tokenizer path, not the data's quality. It prints the split's summary line,
one row's samples, and the largest difference between the stored scores and transformers' scores of the same
conversations rendered with the reward model's own chat template (fp32). Offline once the model is materialized.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reward_model(directory: str) -> str:
    """SmolLM2 with a one-label random score head, saved (with its tokenizer) to `directory`."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from simpo_jax.fixtures import smollm2

    if not os.path.exists(os.path.join(directory, "config.json")):
        tokenizer = AutoTokenizer.from_pretrained(smollm2.model_dir())
        torch.manual_seed(0)
        model = LlamaForSequenceClassification.from_pretrained(smollm2.model_dir(), num_labels=1,
                                                               pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def transformers_scores(directory: str, rows: list[dict]) -> list[tuple[float, float]]:
    """(stored, transformers) score of every scored sample of `rows`."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    model = LlamaForSequenceClassification.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    pairs = []
    for row in rows:
        for sample in row["samples"]:
            if sample["score"] is None:
                continue
            messages = row["chosen"][:-1] + [{"role": "assistant", "content": sample["text"]}]
            ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False,
                            return_tensors="pt")["input_ids"]
            with torch.no_grad():
                pairs.append((sample["score"], model(ids).logits[0, 0].item()))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=6, help="held-out conversations to answer")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default="", help="output directory (default: a temporary one)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import smollm2_hh

    from simpo_jax.onpolicy.build import build

    out = args.out or tempfile.mkdtemp(prefix="onpolicy-smollm2-")
    config = smollm2_hh.get_config()
    config.generate.prompts, config.generate.max_prompts = config.data.eval_split, args.prompts
    config.generate.batch_size = 5 * args.prompts
    config.onpolicy.splits, config.onpolicy.max_new_tokens = ("train",), args.max_new_tokens
    config.judge.reward_model, config.judge.max_length = reward_model(os.path.join(out, "reward_model")), 512
    config.logging.progress_bar = False
    began = time.time()
    [summary] = build(config, os.path.join(out, "data"))
    seconds = time.time() - began
    rows = [json.loads(line) for line in open(os.path.join(out, "data", "train.jsonl"))]
    print(summary.line())
    print(f"on-policy command: {seconds:.1f} s; EOS rate {summary.stop_rate:.2f}; output in {out}")
    print("first row's prompt:", json.dumps(rows[0]["chosen"][:-1], ensure_ascii=False)[:300])
    for sample in rows[0]["samples"]:
        print(f"  seed {sample['seed']:>3}: {sample['tokens']:>3} tokens, {sample['finish_reason']:<6} "
              f"score {sample['score']:+.4f}  {sample['text'][:70]!r}")
    pairs = transformers_scores(config.judge.reward_model, rows)
    print(f"scores vs transformers (fp32, {len(pairs)} answers): max |difference| "
          f"{max((abs(a - b) for a, b in pairs), default=float('nan')):.2e}")


if __name__ == "__main__":
    main()
