"""The inference engine and its server: batched generation with a KV cache over one model, LoRA adapters
loaded by name, OpenAI and vLLM-shaped routes, the receiving side of weight sync (shared memory, broadcast),
and the process that runs it. Online RL rollouts use it; nothing here imports training code."""
