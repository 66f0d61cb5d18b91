"""fellrec_jax: FELLRec (federated fine-tuning of LLM-based recommenders) in JAX/Flax."""
