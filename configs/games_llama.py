"""The Games setup (configs/games.py, docs/method.md §6) on a local 1B-class Llama checkpoint, one GPU, bfloat16.

  python experiments/train.py --config=configs/games_llama.py --config.model.hf_dir=path/to/Llama-3.2-1B \
      --config.data.tokenizer_path=path/to/Llama-3.2-1B --workdir=runs/games_llama
  python experiments/train.py --config=configs/games_llama.py:smoke ...   # two short rounds, to check the setup

The checkpoint is a local Hugging Face Llama directory (config.json, safetensors, tokenizer): e.g.
Llama-3.2-1B (16 layers, d=2048, GQA 32/8 heads, 128k vocabulary, 1.24 B parameters) or TinyLlama-1.1B
(22 layers). Nothing is downloaded. Memory: docs/performance.md, "When memory runs out", has the knobs in
the order to turn them and what each is estimated to save on this shape.
"""

from configs import games

HF_DIR = "checkpoints/Llama-3.2-1B"  # relative to the cwd; or --config.model.hf_dir=...


def get_config(arg: str | None = None):
  c = games.get_config()
  c.model.hf_dir = HF_DIR  # the base model (frozen); its tokenizer must come with it:
  c.data.tokenizer_path = HF_DIR
  # bfloat16 compute (the base's weights as the checkpoint stores them: bfloat16 for Llama 3.2); the adapters,
  # their gradients and AdamW's moments stay float32.
  c.model.dtype = "bfloat16"
  # Split point k: the client runs layers [0, k) and the last layer (with the embeddings, head and loss),
  # the server [k, L-1). The numbers are the same for every k (split == unsplit is exact); k decides what a
  # client holds and computes and what crosses the boundary (metrics.jsonl's comm_bytes). The reference
  # keeps 20 of LLaMA-7B's 32 layers on the client; 10 of Llama-3.2-1B's 16 keeps that share (the client
  # holds ~75% of the base). --config.fed.split_k=1 is the lightest client (embeddings, layer 0, the last
  # layer and the head); TinyLlama's 22 layers: 14 keeps the reference's share.
  c.fed.split_k = 10
  # Learning rate: the reference's 1e-4 is for LLaMA-7B; a 1B model's LoRA (r=8 on q_proj and v_proj, as the
  # reference) has a smaller hidden size and ~1/7 of the 7B's adapter parameters, and 1B-class LoRA
  # fine-tuning commonly runs at 1e-4 to 3e-4. 2e-4 is a starting point, not tuned here: if the weighted
  # validation loss of round 0 rises, halve it.
  c.train.learning_rate = 2e-4
  # Memory (estimates in docs/performance.md): the LM head over a 128k vocabulary in chunks of 2,048
  # positions; one client at a time (each holds its own activations); 4 micro-batches per optimizer step
  # (the step still averages 64 examples, as the reference's). remat (recompute each layer's activations in
  # the backward pass, ~1/3 more FLOPs) is the next knob if a 24-48 GB GPU runs out.
  c.model.loss_chunk = 2048
  c.fed.clients_per_chunk = 1
  c.train.accum_steps = 4
  c.model.remat = False
  c.eval.batch_size = 16  # prompts per generation batch (4 beams each), with a 128k-vocabulary head
  if arg == "reference":  # the authors' behaviours (configs/games.py), their learning rate included
    games.apply_reference(c)
  elif arg == "smoke":
    c.data.max_train_samples = 64
    c.data.max_valid_samples = 32
    c.fed.rounds = 2
    c.fed.local_epochs = 1
    c.eval.max_test_users = 4
    c.eval.max_new_tokens = 32
  elif arg:
    raise ValueError(f"unknown config argument {arg!r} (choose 'smoke' or 'reference')")
  return c
