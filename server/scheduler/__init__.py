"""How a request reaches its backend: directly, or (later) through a dynamic batcher."""
