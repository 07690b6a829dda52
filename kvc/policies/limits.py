"""The bounds every artifact kvc reads must keep, so that nothing it loads can hang it or exhaust memory.

Each is far above any model or deployment that exists (the largest open models have about 130
layers, 128 query heads, head dims of 256, vocabularies of 260k tokens and contexts of 10M) and
far below what would make a check, a table or an allocation take more than a moment.
"""

MAX_FILE_BYTES = 64 * 2**20  # a policy or plan file; SmolLM2's policy is about 0.5 MB, its plan 0.2 MB
MAX_NESTING = 64  # levels of lists and mappings in a YAML or JSON file (a policy uses 7)
MAX_LAYERS = 1024
MAX_HEADS = 1024  # query heads per layer; KV heads are at most as many
MAX_HEAD_DIM = 1024
MAX_VOCAB = 2**24  # token ids below this; a plan's class table has one byte per id
MAX_LEN = 2**24  # tokens of context a policy's model or a plan may name
MAX_BATCH = 2**16
MAX_POOL_KERNEL = 255  # SnapKV pools observation scores over 7 keys
# The largest KV cache a plan may take: twice the memory of a node of eight 141 GB accelerators.
MAX_CACHE_BYTES = 2**41
