"""Defaults shared by every setting: the official SimPO recipe (global batch 128, one epoch, cosine, 10% warmup)."""
from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder


def get_config() -> ConfigDict:
    c = ConfigDict()
    # Model: a Hugging Face directory, or a preset / explicit shape for random init (tiny runs).
    c.model = ConfigDict(dict(
        hf_path="", preset="", dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="full",
        attention_impl="xla", vocab_size=placeholder(int), hidden_size=placeholder(int),
        intermediate_size=placeholder(int), num_layers=placeholder(int), num_heads=placeholder(int),
        num_kv_heads=placeholder(int), max_position_embeddings=placeholder(int),
        # LoRA: rank >= 1 trains adapters on `targets` (default: q/k/v/o/gate/up/down_proj) with scale alpha / rank
        # (alpha defaults to rank; rslora: alpha / sqrt(rank)) and dropout on their input; the base stays frozen in
        # param_dtype. adapter_path: a PEFT adapter directory to continue training (its rank, alpha, targets).
        lora=ConfigDict(dict(rank=0, alpha=placeholder(float), dropout=placeholder(float), targets=placeholder(tuple),
                             rslora=placeholder(bool), adapter_path=""))))
    c.reference = ConfigDict(dict(hf_path=""))  # DPO-style losses: "" = a frozen copy of the initial policy
    c.data = ConfigDict(dict(
        path="", builtin="", builtin_train_rows=0, builtin_eval_rows=0, tokenizer_path="", train_split="train",
        eval_split="test", eval_fraction=0.0, format="auto", prompt_column="prompt", chosen_column="chosen",
        rejected_column="rejected", chat_template=placeholder(str), max_length=2048, max_prompt_length=1800,
        truncation_mode="keep_end", overlong_prompts="truncate", auto_insert_empty_system_msg=True,
        bucket_lengths=placeholder(tuple), pad_to_max_length=False, packing=False, packing_length=0, seed=42,
        shuffle=True, strict=False, num_proc=placeholder(int)))
    c.loss = ConfigDict(dict(
        name="simpo", beta=2.0, gamma_beta_ratio=placeholder(float), gamma=placeholder(float), loss_type="sigmoid",
        label_smoothing=0.0, sft_weight=placeholder(float), length_normalize=placeholder(bool), rdpo_alpha=0.0, slic_delta=1.0, kto_desirable_weight=1.0,
        kto_undesirable_weight=1.0))
    c.optimizer = ConfigDict(dict(learning_rate=1e-6, warmup_ratio=0.1, schedule="cosine", weight_decay=0.0,
                                  b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0))
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, slice=""))
    c.step = ConfigDict(dict(micro_batches=1, logprob_chunk_len=256, reference="model"))
    c.train = ConfigDict(dict(batch_size=128, eval_batch_size=0, num_epochs=1, max_steps=0, seed=0,
                              output_dir="runs/simpo", eval_every=0, log_every=1,
                              # Greedy answers to the first `generate_prompts` held-out prompts every
                              # `generate_every` steps (0 = off) and at the end, written to
                              # <output_dir>/samples/step_<n>.jsonl and judged (see simpo_jax/judging/monitor.py);
                              # `generate_samples` of them go to TensorBoard as a text table. Batching, prompt
                              # buckets and the prompt column follow the generate section below.
                              generate_every=0, generate_prompts=32, generate_max_new_tokens=256,
                              generate_samples=4))
    # directory: "" = <output_dir>/checkpoints; may be a gs:// bucket path (Orbax writes it directly).
    c.checkpoint = ConfigDict(dict(directory="", every=200, keep=3, async_save=True))
    c.logging = ConfigDict(dict(tensorboard=True, wandb_project="", progress_bar=True))
    c.export = ConfigDict(dict(enabled=True, dtype="bfloat16", max_shard_bytes=5 * 1024**3))
    c.score = ConfigDict(dict(split="eval", dump_tokens=False, batch_size=0))
    # Multi-host: "auto" starts a process group on TPU VMs (JAX finds the workers) or when a coordinator is
    # given here or in JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; "off" never does.
    c.distributed = ConfigDict(dict(initialize="auto", coordinator_address="", num_processes=0, process_id=-1,
                                    local_device_ids=""))
    # Sampling (`python -m simpo_jax.generate`): prompts ("" = the run's eval data, else a file / dataset with a
    # messages, prompt or instruction column) rendered as the official on-policy generator renders them
    # (prompt_rendering="training": with training's empty system turn), weights ("" = model.hf_path, else an HF
    # dir or a run's output_dir), sampling parameters and batching; see simpo_jax/generate/config.py.
    c.generate = ConfigDict(dict(
        prompts="", split="test", prompt_column="", apply_chat_template=True, prompt_rendering="official",
        max_prompts=0, dataset_name="", checkpoint="", generator="", max_new_tokens=1024, temperature=0.0, top_k=0,
        top_p=1.0, seed=0, num_samples=1, batch_size=16, max_prompt_length=0, prompt_buckets=placeholder(tuple)))
    # Judging the answers generated during training: reward_model is a Hugging Face *ForSequenceClassification
    # directory or Hub id ("" = none); it scores (prompt, answer) pairs `batch_size` at a time, cut to `max_length`
    # tokens.
    c.judge = ConfigDict(dict(reward_model="", batch_size=8, max_length=2048, dtype="float32"))
    # On-policy preference data (`python -m simpo_jax.onpolicy`): one sample per seed for every prompt of each
    # split of generate.prompts, at the recipe's temperature / top-p / length (the generate section gives the
    # prompt source, batching and buckets), scored by judge.reward_model; best and worst become chosen and
    # rejected. See simpo_jax/onpolicy/config.py.
    c.onpolicy = ConfigDict(dict(seeds=(13, 21, 42, 79, 100), temperature=0.8, top_p=0.95, top_k=0,
                                 max_new_tokens=4096, splits=("train_prefs", "test_prefs"), shard_prompts=256,
                                 min_score_gap=0.0))
    # Fields holding None are typed placeholders, so `--config.<section>.<field>=value` can set them.
    return c
