"""Where things live and how the engine runs: built once from the command line.

Also the model kinds (which folder and which file extensions each has): `Paths.folder` needs
the folder names, and core may not import `pipelines.models`, so the table lives here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.core.control import DEFAULT_MAX_UNITS
from pipelines.core.jobs import DEFAULT_MAX_WAITING
from pipelines.core.uploads import DEFAULT_MAX_UPLOAD_MB, DEFAULT_MAX_UPLOAD_MEGAPIXELS

REPO_ROOT = Path(__file__).resolve().parents[2]
# Checkpoints shipped inside the package (a demo model), searched after the user's folder.
DEMO_CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "demo"


@dataclass(frozen=True)
class ModelKind:
    folder: str  # under --models-dir, A1111's names
    extensions: tuple[str, ...]


MODEL_KINDS: dict[str, ModelKind] = {
    # .gguf: quantized denoisers (SD 3.x, Flux), kept quantized: see models/quantized.py
    "checkpoints": ModelKind("Stable-diffusion", (".safetensors", ".ckpt", ".gguf")),
    "vae": ModelKind("VAE", (".safetensors", ".pt", ".ckpt")),
    "lora": ModelKind("Lora", (".safetensors", ".pt")),
    "esrgan": ModelKind("ESRGAN", (".pth", ".pt", ".safetensors")),
    "embeddings": ModelKind("embeddings", (".safetensors", ".pt", ".bin")),
    "gfpgan": ModelKind("GFPGAN", (".pth", ".pt", ".safetensors")),  # face restorers (and RestoreFormer)
    "codeformer": ModelKind("Codeformer", (".pth", ".pt", ".safetensors")),
    # ControlNet and T2I-Adapter files (A1111's and Forge's folder; ComfyUI's is controlnet/)
    "controlnet": ModelKind("ControlNet", (".safetensors", ".pth", ".pt", ".bin")),
    # the weights of preprocessors that need a network (depth, pose, ...): see generate/control_preprocess.py
    # text encoders kept apart from their denoiser (SD 3: clip_l, clip_g, t5xxl), Forge's and ComfyUI's folder
    "text_encoders": ModelKind("text_encoder", (".safetensors",)),
    "annotators": ModelKind("ControlNet-annotators", (".safetensors", ".pth", ".pt", ".bin")),
    # tiny autoencoders (TAESD / TAESDXL decoders) for previews and fast decodes: A1111's folder
    "vae_approx": ModelKind("VAE-approx", (".pth", ".safetensors")),
    # IP-Adapters (image prompts) and the CLIP vision encoders they read: ComfyUI's folders (A1111's
    # ControlNet extension keeps ip-adapter_* files in models/ControlNet: see models/ip_adapter_files.py)
    "ipadapter": ModelKind("ipadapter", (".safetensors", ".bin", ".pth")),
    "clip_vision": ModelKind("clip_vision", (".safetensors", ".bin")),
}


@dataclass(frozen=True)
class Paths:
    models_dir: Path = REPO_ROOT / "models"
    ckpt_dir: Path | None = None  # default: <models_dir>/Stable-diffusion
    vae_dir: Path | None = None
    lora_dir: Path | None = None
    esrgan_dir: Path | None = None
    embeddings_dir: Path | None = None
    gfpgan_dir: Path | None = None  # --gfpgan-models-path
    codeformer_dir: Path | None = None  # --codeformer-models-path
    controlnet_dir: Path | None = None  # --controlnet-dir
    annotators_dir: Path | None = None  # --controlnet-annotator-models-path
    ipadapter_dir: Path | None = None
    clip_vision_dir: Path | None = None
    data_dir: Path = REPO_ROOT / "data"  # caches (hashes) and user data
    outdir: Path = REPO_ROOT / "outputs"
    demo_dir: Path | None = DEMO_CHECKPOINT_DIR  # None: no demo fallback (tests of an empty folder)
    unet_dirs: tuple[Path, ...] = ()  # --unet-dir (repeatable): more folders of denoiser-only files

    def folder(self, kind: str) -> Path:
        """The folder of a model kind, honouring the per-kind overrides."""
        override = {
            "checkpoints": self.ckpt_dir,
            "vae": self.vae_dir,
            "lora": self.lora_dir,
            "esrgan": self.esrgan_dir,
            "embeddings": self.embeddings_dir,
            "gfpgan": self.gfpgan_dir,
            "codeformer": self.codeformer_dir,
            "controlnet": self.controlnet_dir,
            "annotators": self.annotators_dir,
            "ipadapter": self.ipadapter_dir,
            "clip_vision": self.clip_vision_dir,
        }.get(kind)
        if override is not None:
            return Path(override)
        return Path(self.models_dir) / MODEL_KINDS[kind].folder

    def extra_folders(self, kind: str) -> tuple[Path, ...]:
        """Listed beside a kind's folder: for checkpoints, the --unet-dir folders and ComfyUI's
        models/unet and models/diffusion_models, where people keep GGUF and bare denoiser files."""
        if kind != "checkpoints":
            return ()
        models = Path(self.models_dir)
        return (*map(Path, self.unet_dirs), models / "unet", models / "diffusion_models")

    def fallback(self, kind: str) -> Path | None:
        """Listed in place of a kind's folder while that folder holds none of its files: the
        shipped demo model stands in for checkpoints until the user adds one."""
        return self.demo_dir if kind == "checkpoints" else None


@dataclass(frozen=True)
class EngineSettings:
    device: str = "auto"  # auto | cpu | cuda | mps
    controlnet_max_units: int = DEFAULT_MAX_UNITS  # --controlnet-max-units: units per request (and in the UI)
    precision: str = "auto"  # auto | full | half | bf16
    no_half_vae: bool = False
    attention: str = "auto"  # auto | xformers | sdpa | sliced
    offload: str = "none"  # none | medvram | lowvram
    compile: bool = False  # --compile: torch.compile the U-Net (slow first step, faster later ones)
    # --gguf-dequantize-once: GGUF denoisers' layers keep their decoded weights after the first step:
    # steps about as fast as an unquantized file's, memory as much as one (only where the cache has room)
    gguf_dequantize_once: bool = False
    default_checkpoint: str | None = None  # --ckpt
    ram_budget_gb: float | None = None  # model cache budget; None = derived from the machine
    # A public hosted demo (Hugging Face Space, `--space`): limits on requests, no extension
    # installs, no server-default changes from the UI or the API. See pipelines/core/hosted_limits.py.
    hosted: bool = False
    max_queue_size: int | None = DEFAULT_MAX_WAITING  # jobs waiting (UI and API together); None = no bound
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB  # one uploaded image file (API: the decoded base64)
    max_upload_megapixels: float = DEFAULT_MAX_UPLOAD_MEGAPIXELS  # width x height of an uploaded image
