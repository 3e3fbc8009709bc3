"""Frozen configuration dataclasses, one per stage; the single home of every default.

Standard library only, so ``import xpbatch.config`` (and ``xpbatch --help``) stays instant.
Each field's docstring is the help text of the CLI option generated from it
(:mod:`xpbatch.cli.options`), so it is plain text, without reStructuredText markup.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from xpbatch.errors import ConfigError

C = TypeVar("C")


def did_you_mean(name: str, valid: list[str]) -> str:
    """A ' Did you mean X?' suffix for an unknown name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, valid, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def from_mapping(cls: type[C], values: Mapping[str, Any], *, where: str = "configuration") -> C:
    """Build a config dataclass from a mapping, naming the valid keys when one is unknown."""
    valid = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in values:
        if key not in valid:
            raise ConfigError(
                f"unknown key {key!r} in {where}.{did_you_mean(key, valid)} "
                f"Valid keys: {', '.join(valid)}."
            )
    return cls(**values)


def field_choices(cls: type) -> dict[str, tuple[str, ...]]:
    """The choices of each field of ``cls`` annotated ``Literal[...]``: the one declaration that
    ``__post_init__`` checks (:func:`_check_choices`) and the CLI offers (``click.Choice``)."""
    hints = typing.get_type_hints(cls).items()
    return {name: typing.get_args(h) for name, h in hints if typing.get_origin(h) is Literal}


def _check_choices(config: Any) -> None:
    """Raise ConfigError naming the valid choices (and the closest one) for a field of
    ``config`` whose value is not one of its :func:`field_choices`."""
    for name, choices in field_choices(type(config)).items():
        value = getattr(config, name)
        if value not in choices:
            raise ConfigError(
                f"{name} must be one of {', '.join(choices)}, got {value!r}."
                f"{did_you_mean(str(value), list(choices))}"
            )


RUN_CONTROL_FIELDS = ("resume", "overwrite", "break_lock", "progress_bar")
"""Config fields that steer one run without changing its result: never part of a fingerprint
or of the provenance an output records, so a resumed output equals an uninterrupted one."""


def result_options(config: Any) -> dict[str, Any]:
    """The fields of a stage config that shape its output (all but :data:`RUN_CONTROL_FIELDS`)."""
    options = dataclasses.asdict(config)
    return {name: value for name, value in options.items() if name not in RUN_CONTROL_FIELDS}


def _check_resume_or_overwrite(config: Any, what: str) -> None:
    """One of ``--resume`` (continue) and ``--overwrite`` (start again), never both."""
    if config.resume and config.overwrite:
        raise ConfigError(
            f"--resume continues an existing {what} and --overwrite replaces it; give one"
        )


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """Options of every command that writes: an output already there, and the output's lock."""

    overwrite: bool = False
    """Replace an output this command wrote earlier (xpbatch recognises its own record of it);
    never a file or directory xpbatch did not write, nor another command's output."""
    break_lock: bool = False
    """Take over the output's lock from a run on another host that you checked is gone (a dead
    run on this host is recognised by itself)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the scatter VAE (Laroche & Speagle 2024)."""

    input_dim: int = 110
    """Number of input coefficients (55 BP + 55 RP in DR3)."""
    hidden_widths: tuple[int, ...] = (90, 70, 50, 30, 10)
    """Encoder layer widths; the decoders use them in reverse."""
    latent_dim: int = 6
    """Size of the latent space."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_widths", tuple(int(w) for w in self.hidden_widths))
        if self.input_dim < 1 or self.latent_dim < 1:
            raise ConfigError(
                "input_dim and latent_dim must be positive, "
                f"got {self.input_dim}, {self.latent_dim}"
            )
        if not self.hidden_widths or min(self.hidden_widths) < 1:
            raise ConfigError(f"hidden_widths must be positive integers, got {self.hidden_widths}")


CLUSTER_LOCAL_CUDA = "local-cuda"
GPU_THREADS_PER_WORKER = 8
"""Chunk tasks at once on one GPU worker. The GPU needs ~0.1 µs per spectrum; the host needs
~3-4 core-µs (read and decompress the inputs, pack and copy, compress and write the outputs,
verify), much of it in zarr and numcodecs outside the GIL. Eight threads overlap one chunk's
device work with seven others' I/O and keep about 1-2 M spectra/s of host work in flight per
GPU; more only adds memory (each thread holds up to two 65k-row chunks, ~0.2 GB)."""


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Which Dask cluster a stage runs on (shared by ``ingest`` and ``encode-catalog``)."""

    cluster: str | None = None
    """Omit (None) for a LocalCluster of worker processes on this machine; 'local-cuda' for
    dask-cuda's LocalCUDACluster, one worker per GPU; or the address of a running scheduler
    ('tcp://host:8786')."""
    scheduler_file: str | None = None
    """Connect to the scheduler described by this file, written by 'dask scheduler
    --scheduler-file' (Slurm, a shared filesystem)."""
    n_workers: int | None = None
    """Worker processes of a LocalCluster; default one per core."""
    threads_per_worker: int | None = None
    """Threads (chunk tasks at once) per worker of a local cluster; default 1 on CPU workers
    (one per core) and xpbatch.config.GPU_THREADS_PER_WORKER on 'local-cuda' GPU workers. Each
    task thread uses one torch thread."""
    memory_limit: str = "auto"
    """Memory limit per LocalCluster worker ('auto' divides the machine's memory)."""
    dashboard_address: str = "127.0.0.1:8787"
    """Where a LocalCluster's dashboard listens; localhost unless asked otherwise (':0' for
    any free port)."""

    def __post_init__(self) -> None:
        if self.cluster is not None and self.scheduler_file is not None:
            raise ConfigError("give either --cluster or --scheduler-file, not both")
        if self.cluster is not None and not (
            self.cluster == CLUSTER_LOCAL_CUDA or self.cluster.startswith(("tcp://", "tls://"))
        ):
            raise ConfigError(
                f"--cluster must be omitted (local CPU cluster), {CLUSTER_LOCAL_CUDA!r} or a "
                f"scheduler address like 'tcp://host:8786', got {self.cluster!r}"
            )
        if self.n_workers is not None and self.n_workers < 1:
            raise ConfigError(f"n_workers must be at least 1, got {self.n_workers}")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ConfigError(
                f"threads_per_worker must be at least 1, got {self.threads_per_worker}"
            )


Device = Literal["auto", "cpu", "cuda"]
"""Where torch runs (:func:`xpbatch.model.device.resolve_device`)."""
DEVICES: tuple[str, ...] = typing.get_args(Device)


@dataclasses.dataclass(frozen=True)
class EncodeConfig(OutputOptions):
    """How ``encode-catalog`` runs (what it computes is fixed by the store and the model)."""

    batch_size: int = 4096
    """Rows per forward pass; every pass is padded to this size, so results do not depend on
    the chunking. The kernels' default too (xpbatch.encode.kernel.DEFAULT_BATCH_SIZE)."""
    with_reconstruction: bool = False
    """Also store the decoder's reconstruction (source, coeff) in e-/s: about twice the size."""
    resume: bool = False
    """Continue an interrupted run of the same store, model and options: skip recorded chunks;
    refuse when they differ. Without an earlier run, start a new one."""
    device: Device = "auto"
    """Torch device on each worker: 'auto' = the worker's GPU when it has one, else the CPU."""
    tasks_per_thread: int = 2
    """Chunks in flight per worker thread: enough to keep workers busy while results come
    back, few enough that the client and the workers hold a bounded amount of memory."""
    max_attempts: int = 3
    """Times a chunk is run before the run fails (a worker dying under it or an error both
    count; every chunk write is idempotent, so rerunning one is safe)."""
    no_workers_timeout: float = 600.0
    """Seconds the run waits for a cluster that has no workers before failing (resumably)."""
    verify: bool = True
    """Re-read and check every chunk at the end, before marking the catalogue complete."""
    check_fit: bool = True
    """Before any work, refuse a model whose training data do not look like the store's first
    rows (xpbatch.model.fit_check: scaled or foreign-unit coefficients, a foreign normalisation)."""
    progress_bar: bool = True
    """Show a progress bar of spectra done, spectra/s and ETA on stderr."""
    performance_report: str | None = None
    """Save Dask's performance report of the run to this HTML file (needs a cluster)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        _check_resume_or_overwrite(self, "catalogue")
        _check_choices(self)
        if self.tasks_per_thread < 1 or self.max_attempts < 1:
            raise ConfigError(
                f"tasks_per_thread and max_attempts must be at least 1, got "
                f"{self.tasks_per_thread} and {self.max_attempts}"
            )
        if not self.no_workers_timeout > 0:
            raise ConfigError(
                f"no_workers_timeout must be positive seconds, got {self.no_workers_timeout}"
            )


# Rows per chunk of an XP store. Measured on 262k mock rows (2 shared cores, blosc-zstd):
# 65536 rows (29 MB per float32 variable) wrote and read fastest; 16384 was ~10 % slower,
# 131072 read 2x slower. store.DEFAULT_CHUNK_ROWS re-exports it.
DEFAULT_CHUNK_ROWS = 65536


@dataclasses.dataclass(frozen=True)
class IngestConfig(OutputOptions):
    """How ``xpbatch ingest`` turns DR3 XP files into an XP store."""

    chunk_rows: int = DEFAULT_CHUNK_ROWS
    """Rows per chunk of the output store."""
    on_bad_row: Literal["error", "skip"] = "error"
    """'error': a malformed row stops the ingest; 'skip': leave it out and record it."""
    with_correlations: bool = False
    """Also parse and store the packed BP/RP coefficient correlations (15x the size)."""
    scalars: tuple[str, ...] | None = None
    """DR3 scalar columns to keep when the files have them (e.g. 'bp_chi_squared'); None keeps
    all present. On the command line: comma-separated names, or 'none'."""
    verify_md5: bool = True
    """Check each file against a _MD5SUM.txt beside it, when there is one."""
    resume: bool = False
    """Continue an interrupted ingest of the same files and options: reuse the files already
    parsed (<output>.parts/); refuse when they differ. Without an earlier run, start a new one."""
    progress_bar: bool = True
    """Show a progress bar of XP files parsed on stderr."""
    keep_parts: bool = False
    """Keep the per-file staging parts (<output>.parts/) after a successful ingest."""
    columns: tuple[tuple[str, str], ...] = ()
    """(DR3 name, the file's name) of XP columns named otherwise; '{i}' in the file's name
    stands for the coefficient index of one-column-per-coefficient tables. On the command
    line: comma-separated DR3_NAME=FILE_NAME, e.g.
    'bp_coefficients=BPc{i},bp_coefficient_errors=BPe{i}'."""

    def __post_init__(self) -> None:
        if self.scalars is not None:
            object.__setattr__(self, "scalars", tuple(self.scalars))
        object.__setattr__(self, "columns", tuple((str(a), str(b)) for a, b in self.columns))
        if not 1 <= self.chunk_rows <= 1 << 20:
            raise ConfigError(f"chunk_rows must be in 1..{1 << 20}, got {self.chunk_rows}")
        _check_choices(self)
        _check_resume_or_overwrite(self, "store")


# Rows per mock bulk file: DR3's 3386 XpContinuousMeanSpectrum files hold 64.7k rows on average.
MOCK_ROWS_PER_FILE = 65_000


@dataclasses.dataclass(frozen=True)
class MockConfig(OutputOptions):
    """How ``xpbatch mock`` draws its synthetic catalogue and writes it.

    The fields from ``giant_fraction`` on decide the rows' values (with ``n`` and ``seed``);
    the others only say how they are written (:meth:`row_settings` tells them apart).
    """

    n: int = 10_000
    """Number of sources."""
    seed: int = 0
    """Random seed: the same n, seed and row settings give the same rows in both formats."""
    format: Literal["store", "dr3-bulk"] = "store"
    """'store' (an XP store) or 'dr3-bulk' (Gaia DR3 bulk files: XpContinuousMeanSpectrum_*.csv.gz
    + GaiaSource companions + _MD5SUM.txt, to feed `xpbatch ingest`)."""
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    """Rows per store chunk (store)."""
    rows_per_file: int = MOCK_ROWS_PER_FILE
    """Rows per bulk file, about: files hold whole HEALPix pixels (dr3-bulk; a store records the
    partition ranges of these files)."""
    workers: int = 1
    """Bulk files written at once, in threads (dr3-bulk)."""
    with_correlations: bool = False
    """Also store the packed correlation arrays, like `xpbatch ingest --with-correlations`
    (store)."""
    scalars: tuple[str, ...] = ()
    """DR3 scalar columns to store too (e.g. 'bp_chi_squared'), like `xpbatch ingest --scalars`
    (store; bulk files always hold them all)."""
    giant_fraction: float = 0.3
    """Fraction of stars on the giant branch (red clump included); the rest are dwarfs."""
    metallicity_mean: float = -0.1
    """Mean [M/H] (dex) of the normal distribution stars are drawn from."""
    metallicity_std: float = 0.3
    """Standard deviation of [M/H] (dex); draws are clipped to [-2.5, 0.6]."""
    extinction_plane: float = 1.2
    """Mean A_V (mag, exponential distribution) in the Galactic plane; it falls with |b|."""
    extinction_pole: float = 0.05
    """Mean A_V (mag) towards the Galactic poles."""
    g_mag_min: float = 3.0
    """Brightest G magnitude drawn."""
    g_mag_limit: float = 17.65
    """G magnitude up to which the number counts rise (DR3's XP selection limit)."""
    counts_slope: float = 0.35
    """Slope of log10 number counts per magnitude (stars per 0.1 mag grow by 10**slope per mag)."""
    faint_fraction: float = 0.005
    """Fraction of sources fainter than g_mag_limit (down to G = 20.5), like DR3's few."""
    bp_missing_fraction: float = 0.001
    """Fraction of rows without a BP spectrum (DR3 has one; more here so the path is exercised)."""
    rp_missing_fraction: float = 0.0002
    """Fraction of rows without an RP spectrum."""
    non_finite_fraction: float = 0.001
    """Fraction of rows with a NaN/inf coefficient or a zero error in a present band."""
    g_flux_missing_fraction: float = 0.001
    """Fraction of rows without phot_g_mean_flux and without phot_g_mean_mag."""
    add_noise: bool = True
    """Add Gaussian noise with the coefficient errors; False gives the noiseless spectra."""
    binary_fraction: float = 0.0
    """Fraction of unresolved binaries: the sum of two stars' spectra (population 'binary')."""
    emission_line_fraction: float = 0.0
    """Fraction of stars with Hα and Hβ in emission (population 'emission_line')."""
    white_dwarf_fraction: float = 0.0
    """Fraction of DA white dwarfs, 7000-30000 K with broad Balmer lines ('white_dwarf')."""

    def __post_init__(self) -> None:
        if isinstance(self.scalars, list):  # from a TOML file
            object.__setattr__(self, "scalars", tuple(self.scalars))
        kinds: dict[str, tuple[type, ...]] = {
            "bool": (bool,),
            "int": (int,),
            "float": (int, float),
            "str": (str,),
            "tuple[str, ...]": (tuple,),
        }
        _check_choices(self)
        choices = field_choices(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            is_flag = field.type == "bool"
            if field.name in choices:
                continue
            if isinstance(value, bool) != is_flag or not isinstance(value, kinds[str(field.type)]):
                raise ConfigError(
                    f"{field.name} must be {field.type}, got {value!r} ({type(value).__name__})"
                )
        if self.n < 1:
            raise ConfigError(f"a mock catalogue needs at least 1 row, got n={self.n}")
        for name in ("chunk_rows", "rows_per_file", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed}")
        if self.format != "store" and (self.with_correlations or self.scalars):
            raise ConfigError(
                "with_correlations and scalars apply to format 'store' only (bulk files always "
                f"hold the correlations and every scalar), got format {self.format!r}"
            )
        fractions = {
            "giant_fraction": self.giant_fraction,
            "faint_fraction": self.faint_fraction,
            "bp_missing_fraction": self.bp_missing_fraction,
            "rp_missing_fraction": self.rp_missing_fraction,
            "non_finite_fraction": self.non_finite_fraction,
            "g_flux_missing_fraction": self.g_flux_missing_fraction,
            **self.rare_fractions,
        }
        for name, value in fractions.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a fraction in [0, 1], got {value}")
        defects = sum(v for k, v in fractions.items() if k.endswith("missing_fraction"))
        defects += self.non_finite_fraction
        if defects > 0.5:
            raise ConfigError(
                f"the defect fractions (missing BP, RP, G flux, non-finite) add up to {defects}; "
                "they are exclusive per row and must add up to at most 0.5"
            )
        if sum(self.rare_fractions.values()) > 1.0:
            raise ConfigError(
                f"the rare-population fractions {self.rare_fractions} add up to more than 1"
            )
        if self.metallicity_std < 0 or self.extinction_plane < 0 or self.extinction_pole < 0:
            raise ConfigError(
                "metallicity_std, extinction_plane and extinction_pole must be >= 0, got "
                f"{self.metallicity_std}, {self.extinction_plane}, {self.extinction_pole}"
            )
        if not self.g_mag_min < self.g_mag_limit:
            raise ConfigError(
                f"g_mag_min ({self.g_mag_min}) must be brighter (smaller) than g_mag_limit "
                f"({self.g_mag_limit})"
            )

    def row_settings(self) -> dict[str, float | bool]:
        """The settings besides n and seed that decide the rows' values (what a mock records)."""
        how_written = {"n", "seed", "format", "chunk_rows", "rows_per_file", "workers"}
        how_written |= {"with_correlations", "scalars", "overwrite", "break_lock"}
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name not in how_written
        }

    @property
    def rare_fractions(self) -> dict[str, float]:
        """The rare populations' fractions by field name (binary, emission_line, white_dwarf)."""
        return {
            "binary_fraction": self.binary_fraction,
            "emission_line_fraction": self.emission_line_fraction,
            "white_dwarf_fraction": self.white_dwarf_fraction,
        }


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML configuration file; errors name the file and say what is wrong."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"configuration file {path} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"configuration file {path} is not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"configuration file {path} is not text (byte {e.start} is not UTF-8); give a TOML "
            "file of settings"
        ) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class TrainConfig(OutputOptions):
    """How ``xpbatch train`` fits the scatter VAE; the defaults reproduce the published run.

    In a TOML file (``--config``) every field is a top-level key, and the architecture is the
    table ``[model]`` (keys of :class:`ModelConfig`).
    """

    epochs: int = 5000
    """Passes over the training rows (published: 5000)."""
    learning_rate: float = 1e-4
    """AdamW learning rate at the start of every cosine cycle (published: 1e-4)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (published: torch's default, 0.01)."""
    cycle_epochs: int = 500
    """Epochs per cosine-annealing cycle before each warm restart (T_0; published: 500)."""
    min_learning_rate: float = 1e-10
    """Learning rate at the end of every cycle (eta_min; published: 1e-10)."""
    batch_size: int = 1024
    """Spectra per optimisation step (published: 1024)."""
    kl_weight: float = 1.0
    """Weight of the KL term in the loss; 1 is the published loss."""
    seed: int = 0
    """Seed of the sample, the split, the initial weights, the shuffles and the latent draws."""
    validation_fraction: float = 0.1
    """Fraction of the selected rows held out for validation (0: no validation)."""
    sample: int | None = None
    """Train on a seeded random sample of this many usable rows instead of all of them."""
    source_ids: str | None = None
    """File of the source_ids to train on: one per line, or a CSV/Parquet column 'source_id'."""
    partial_rows: bool = False
    """Also train on rows with a missing band or non-finite values (masked in the loss); by
    default they are excluded, as in the published training set."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every this many epochs (and always at the end)."""
    device: Device = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'."""
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    """'fp32'; on CUDA also 'tf32' (TF32 matmuls) or 'bf16' (bfloat16 autocast)."""
    data_placement: Literal["auto", "device", "stream"] = "auto"
    """'device': load the rows onto the device once; 'stream': read shuffled chunks from the
    store every epoch; 'auto': 'device' when they fit in device_memory_fraction."""
    device_memory_fraction: float = 0.5
    """Share of the free device memory (available host memory on CPU) resident data may use."""
    shuffle_chunks: int = 4
    """Streaming: store chunks read and shuffled together (more mixes better, costs memory)."""
    early_stopping: int | None = None
    """Stop when the validation loss has not improved on its best for this many epochs, and keep
    the best epoch's weights (None: train every epoch). Needs validation rows."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Architecture of the network (TOML table [model])."""
    resume: bool = False
    """Continue the run from the checkpoint beside the model file (refused when the store, the
    split or a setting that changes the result differs; epochs may be raised). Without a
    checkpoint, start a new run."""
    progress_bar: bool = True
    """Show a progress bar (epoch, losses, samples/s) on stderr."""

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):
            model = from_mapping(ModelConfig, self.model, where="[model]")
            object.__setattr__(self, "model", model)
        positive = {
            "epochs": self.epochs,
            "cycle_epochs": self.cycle_epochs,
            "batch_size": self.batch_size,
            "checkpoint_every": self.checkpoint_every,
            "shuffle_chunks": self.shuffle_chunks,
        }
        for name, value in positive.items():
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be at least 2 (BatchNorm), got {self.batch_size}")
        if self.sample is not None and (not _is_int(self.sample) or self.sample < 2):
            raise ConfigError(f"sample must be an integer of at least 2 rows, got {self.sample!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not self.learning_rate > 0 or not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ConfigError(
                f"need learning_rate > 0 and 0 <= min_learning_rate <= learning_rate, got "
                f"{self.learning_rate} and {self.min_learning_rate}"
            )
        if self.weight_decay < 0 or self.kl_weight < 0:
            raise ConfigError(
                f"weight_decay and kl_weight must be >= 0, got {self.weight_decay}, "
                f"{self.kl_weight}"
            )
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if not 0 < self.device_memory_fraction <= 1:
            raise ConfigError(
                f"device_memory_fraction must be in (0, 1], got {self.device_memory_fraction}"
            )
        if self.early_stopping is not None:
            if not _is_int(self.early_stopping) or self.early_stopping < 1:
                raise ConfigError(
                    f"early_stopping (patience in epochs) must be a positive integer, got "
                    f"{self.early_stopping!r}"
                )
            if self.validation_fraction == 0:
                raise ConfigError(
                    "early_stopping watches the validation loss: it needs validation_fraction > 0"
                )
        _check_choices(self)
        if self.precision != "fp32" and self.device == "cpu":
            raise ConfigError(f"precision {self.precision!r} needs device 'cuda' (or 'auto')")
        _check_resume_or_overwrite(self, "training run")

    @classmethod
    def from_toml(
        cls,
        path: str | os.PathLike[str] | None,
        overrides: Mapping[str, Any] | None = None,
        *,
        preset: TrainPreset | None = None,
    ) -> TrainConfig:
        """The settings of ``preset`` (if any), then the file at ``path`` (if any; not its
        ``[storage]`` table), then ``overrides`` (CLI flags) on top."""
        found = read_toml(path) if path is not None else {}
        values = {k: v for k, v in found.items() if k != "storage"}
        where = f"configuration file {path}" if path is not None else "configuration"
        base = TRAIN_PRESETS[preset] if preset is not None else {}
        return from_mapping(cls, {**base, **values, **(overrides or {})}, where=where)


TrainPreset = Literal["published", "quick"]
"""The named starting points of ``xpbatch train --preset``."""

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "published": {},
    "quick": {
        "epochs": 40,
        "learning_rate": 2e-3,
        "cycle_epochs": 40,
        "batch_size": 512,
        "early_stopping": 5,
    },
}
"""``xpbatch train --preset NAME``: settings over :class:`TrainConfig`'s defaults (flags and
``--config`` win). 'published' is the published run (5000 epochs on every usable row); 'quick'
trains at a higher learning rate in one short cosine cycle and stops once the validation loss
stops improving: a first model in minutes on a CPU for a store of tens of thousands of rows, to
try the pipeline (not for science; on a larger store add ``--sample``)."""


@dataclasses.dataclass(frozen=True)
class ParquetExportConfig(OutputOptions):
    """How ``export-parquet`` writes a catalogue as Parquet files, one per DR3 partition."""

    threads: int | None = None
    """Threads of the local pool when no Dask client is given; default one per core."""
    resume: bool = False
    """Continue an interrupted export of the same catalogue split by the same partition ranges:
    keep the whole files, write the missing ones; refuse when they differ. Without an earlier
    export, start a new one."""
    progress_bar: bool = True
    """Show a progress bar of the files written on stderr."""

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")
        _check_resume_or_overwrite(self, "export")


@dataclasses.dataclass(frozen=True)
class HatsExportConfig(OutputOptions):
    """How ``export-hats`` writes a catalogue as a HATS collection (hats-import does the work)."""

    name: str = "xpbatch_latents"
    """Name of the HATS catalogue in the collection (its index and margin are named after it)."""
    pixel_threshold: int = 1_000_000
    """Most rows of one partition: denser sky gets smaller (higher-order) HEALPix partitions."""
    highest_order: int = 10
    """Highest HEALPix order a partition may have."""
    margin_arcsec: float | None = None
    """Also write a margin cache of this width (arcsec), for cross-matches across partition
    edges; None writes none."""
    with_scatter: bool = False
    """Also export the predicted scatter, one column per coefficient (110 float32 columns)."""
    positions_from_source_id: bool = False
    """For a catalogue without ra/dec: place every row at the centre of its source_id's
    HEALPix level-12 pixel (about 0.86 arcmin across), marked in the column
    position_from_source_id."""
    resume: bool = False
    """Continue an interrupted export of the same catalogue with the same options (refused
    when they differ). Without an earlier export, start a new one."""
    progress_bar: bool = True
    """Show hats-import's progress bars on stderr."""

    def __post_init__(self) -> None:
        if self.pixel_threshold < 1:
            raise ConfigError(f"pixel_threshold must be at least 1, got {self.pixel_threshold}")
        if not 0 <= self.highest_order <= 19:
            raise ConfigError(f"highest_order must be in 0..19, got {self.highest_order}")
        if self.margin_arcsec is not None and not self.margin_arcsec > 0:
            raise ConfigError(f"margin_arcsec must be positive, got {self.margin_arcsec}")
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"name may hold letters, digits, '_' and '-' only, got {self.name!r}")
        _check_resume_or_overwrite(self, "export")


@dataclasses.dataclass(frozen=True)
class NeighboursConfig(OutputOptions):
    """How ``neighbours`` searches; its ``--output`` table follows the one output rule."""

    k: int = 100
    """Neighbours of each query source."""


@dataclasses.dataclass(frozen=True)
class SkyMapConfig(OutputOptions):
    """How ``skymap`` draws; its PNG follows the one output rule."""

    order: int | None = None
    """HEALPix order, 0 to 12; default: the finest (up to 5) with 20+ sources a pixel on average."""
