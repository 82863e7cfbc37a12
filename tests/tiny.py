"""The tiny model and text the shared fixtures train on."""

from rlhf_ray.config import ModelConfig

TINY_MODEL = ModelConfig(
    hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, max_seq_len=128
)
FACTS = (
    "The capital of France is Paris. The capital of Japan (日本) is Tokyo. "
    "The capital of Peru is Lima. The capital of Kenya is Nairobi. Ça va? 🙂"
)
