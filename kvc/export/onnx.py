"""Generation from a `kvc export` folder over onnxruntime: `OnnxGenerator(folder).generate(prompts)`.

The prefill graph takes the left-padded prompts (as long as the batch's longest, or the manifest's
shortest prompt if that is longer),
the step graph one token per sequence with the cache state. The state never leaves onnxruntime
between steps: each step's outputs are bound as the next step's inputs (I/O binding), on the
CPU or, with the CUDA provider, on the GPU. Greedy by default; a temperature > 0 samples (with
top-p) from a seeded generator. No torch here: onnxruntime, numpy and the tokenizer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvc.policies.errors import KvcError
from kvc.report import human_bytes

MANIFEST_VERSION = 1  # the exporter's (kvc.export.exporter.MANIFEST_VERSION, not imported: it needs torch)
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
ELEMENT_BYTES = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(bfloat16)": 2, "tensor(uint8)": 1,
                 "tensor(int32)": 4, "tensor(int64)": 8}


def read_manifest(folder) -> dict:
    """The manifest of an export folder, refusing a folder that is not one (one line)."""
    path = Path(folder) / "manifest.json"
    if not Path(folder).is_dir():
        raise KvcError(f"--onnx {folder}: not a folder; give the folder `kvc export` wrote")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise KvcError(f"--onnx {folder}: no readable manifest.json ({getattr(error, 'strerror', None) or error}); "
                       "is it a folder `kvc export` wrote?") from None
    if manifest.get("kvc_export") != MANIFEST_VERSION:
        raise KvcError(f"--onnx {folder}: export format {manifest.get('kvc_export')!r}, this kvc reads "
                       f"{MANIFEST_VERSION}; export the model again")
    return manifest


def providers(device: str = "auto") -> list[str]:
    """onnxruntime's providers for a device: auto takes CUDA when this onnxruntime has it."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if device not in PROVIDERS:
        raise KvcError(f"--device {device}: onnxruntime runs on auto, cpu or cuda")
    if PROVIDERS[device][0] not in available:
        raise KvcError(f"--device {device}: this onnxruntime has no {PROVIDERS[device][0]} (it has "
                       f"{', '.join(available)}); install onnxruntime-gpu for CUDA")
    return PROVIDERS[device]


@dataclass
class OnnxGeneration:
    texts: list[str]
    tokens: list[list[int]]  # the new tokens of each prompt (up to and with its end-of-sequence token)
    prompt_tokens: list[int]
    new_tokens: int  # steps run (the longest continuation)
    cache_bytes: int  # the state onnxruntime holds, with the plan's tables inside the graphs
    prefill_seconds: float
    decode_seconds: float
    provider: str

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"onnxruntime ({self.provider}): kv cache {human_bytes(self.cache_bytes)} (the plan's bytes); "
                f"prefill {self.prefill_seconds:.2f} s; decode {self.decode_tokens_per_second:.1f} tokens/s")


class OnnxGenerator:
    """The two graphs of an export folder in onnxruntime sessions, and the loop that drives them."""

    def __init__(self, folder, device: str = "auto", threads: int | None = None):
        import onnxruntime
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.manifest = read_manifest(folder)
        self.providers = providers(device)
        self.device = "cuda" if self.providers[0].startswith("CUDA") else "cpu"
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # warnings about nodes it cannot constant-fold are not the user's concern
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.sessions = {name: onnxruntime.InferenceSession(str(self.folder / f"{name}.onnx"), options,
                                                                providers=self.providers)
                             for name in ("prefill", "step")}
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        except Exception as error:  # onnxruntime raises its own exception types for missing or damaged files
            raise KvcError(f"--onnx {folder}: cannot load the export ({str(error).splitlines()[0]})") from None
        self.state_names = [entry["name"] for entry in self.manifest["state"]]
        self.batch, self.chunk = self.manifest["batch"], self.manifest["chunk"]
        self.max_len = self.manifest["plan"]["max_len"]

    # ------------------------------------------------------------ the two graphs
    def prefill(self, sequences: list[list[int]]):
        """Left-pad the prompts and run the prefill graph: (last logits (batch, vocab), the state)."""
        if len(sequences) != self.batch:
            raise KvcError(f"this export serves batches of {self.batch} prompts, not {len(sequences)}; "
                           f"export again with --batch {len(sequences)}")
        length = max(max(len(ids) for ids in sequences), self.manifest["shortest_prompt"])
        self.check_length(length)
        input_ids = np.full((self.batch, length), self.manifest["pad_token_id"], dtype=np.int64)
        attention_mask = np.zeros((self.batch, length), dtype=np.int64)
        for row, ids in enumerate(sequences):
            input_ids[row, length - len(ids):] = ids
            attention_mask[row, length - len(ids):] = 1
        outputs = self._run("prefill", {"input_ids": input_ids, "attention_mask": attention_mask}, [])
        return outputs[0].numpy(), outputs[1:]

    def step(self, token_ids: np.ndarray, state):
        """Run the step graph on (batch, chunk) ids: (logits (batch, chunk, vocab), the new state)."""
        outputs = self._run("step", {"input_ids": np.asarray(token_ids, dtype=np.int64)}, state)
        return outputs[0].numpy(), outputs[1:]

    def _run(self, name: str, inputs: dict, state):
        import onnxruntime

        session = self.sessions[name]
        binding = session.io_binding()
        for key, array in inputs.items():
            binding.bind_ortvalue_input(key, onnxruntime.OrtValue.ortvalue_from_numpy(array, self.device))
        for key, value in zip(self.state_names, state):
            binding.bind_ortvalue_input(f"past.{key}", value)
        for output in session.get_outputs():
            binding.bind_output(output.name, "cpu" if output.name == "logits" else self.device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def check_length(self, length: int) -> None:
        if length > self.max_len:
            raise KvcError(f"the sequence needs {length} tokens but the export's plan serves {self.max_len}; "
                           "compile the plan for a longer --max-len and export again")

    def state_bytes(self, state) -> int:
        return sum(int(np.prod(value.shape())) * ELEMENT_BYTES[value.data_type()] for value in state)

    # ------------------------------------------------------------ the loop
    def encode(self, prompts: list[str], chat: bool = False) -> list[list[int]]:
        from kvc.runtime.generate import encode_prompts

        return encode_prompts(self.tokenizer, prompts, chat)

    def generate(self, prompts, max_new_tokens: int = 64, chat: bool = False, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> OnnxGeneration:
        """Continue each prompt: greedily, or sampling at `temperature` from the top-p mass."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if max_new_tokens < 1:
            raise KvcError(f"generate: max_new_tokens is {max_new_tokens}; give at least 1")
        if self.chunk != 1:
            raise KvcError(f"this export's step takes {self.chunk} tokens at a time; generation decodes one "
                           "(export with --chunk 1)")
        sequences = self.encode(prompts, chat)
        pick = _sampler(temperature, top_p, seed)
        began = time.perf_counter()
        logits, state = self.prefill(sequences)
        self.check_length(max(max(map(len, sequences)), self.manifest["shortest_prompt"]) + max_new_tokens - 1)
        prefilled = time.perf_counter()
        eos, pad = self.manifest["eos_token_id"], self.manifest["pad_token_id"]
        tokens = [[] for _ in sequences]
        done = np.zeros(len(sequences), dtype=bool)
        for step in range(max_new_tokens):
            chosen = np.where(done, pad, pick(logits))
            for row, token in enumerate(chosen):
                if not done[row]:
                    tokens[row].append(int(token))
            done |= chosen == eos
            if done.all() or step == max_new_tokens - 1:
                break
            logits, state = self.step(chosen[:, None], state)
            logits = logits[:, -1]
        ended = time.perf_counter()
        return OnnxGeneration(
            texts=self.tokenizer.batch_decode(tokens, skip_special_tokens=True), tokens=tokens,
            prompt_tokens=[len(ids) for ids in sequences], new_tokens=max(len(row) for row in tokens),
            cache_bytes=self.state_bytes(state) + self.manifest["plan"]["table_bytes"],
            prefill_seconds=prefilled - began, decode_seconds=ended - prefilled, provider=self.providers[0])


def _sampler(temperature: float, top_p: float, seed: int):
    """logits (batch, vocab) -> (batch,) token ids: argmax at temperature 0, else a seeded top-p sample."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise KvcError(f"--temperature {temperature} / --top-p {top_p}: the temperature is at least 0, top-p in (0, 1]")
    if temperature == 0:
        return lambda logits: logits.argmax(-1)
    generator = np.random.default_rng(seed)

    def sample(logits):
        scaled = logits.astype(np.float64) / temperature
        probs = np.exp(scaled - scaled.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, -1)
        ordered = np.take_along_axis(probs, order, -1)
        keep = np.cumsum(ordered, -1) - ordered < top_p  # the smallest prefix holding top_p of the mass
        ordered = np.where(keep, ordered, 0.0)
        ordered /= ordered.sum(-1, keepdims=True)
        picks = [order[row, generator.choice(ordered.shape[1], p=ordered[row])] for row in range(len(ordered))]
        return np.array(picks, dtype=np.int64)

    return sample
