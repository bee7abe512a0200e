"""Moved: training is ``demul_fast.app.train`` (the loop), with its parts in ``demul_fast.app``
(config, models, run_folder, phi_cache, evaluate) and ``demul_fast.data.folders``. This stub
keeps the old names for one release (``demul_fast._moved``)."""

from ._moved import forward

__getattr__, __dir__ = forward(__name__, {
    "demul_fast.app.train": ("train", "data_split"),
    "demul_fast.app.config": ("TrainConfig", "default_workers"),
    "demul_fast.app.evaluate": ("evaluate", "image_features", "accuracy"),
    "demul_fast.app.models": ("load_clip", "build_module"),
    "demul_fast.app.run_folder": ("RUN_FILE", "SPLIT_FILE", "LOG_FILE", "STATE_FILE", "RUN_FILES", "PROMPTS_DIR",
                                  "LLM_FILE", "PHI_FILE", "RESUME_KEYS", "OutputExistsError", "run_log"),
    "demul_fast.app.checkpoint": ("CheckpointError",),
    "demul_fast.data": ("DataError",),
    "demul_fast.data.folders": ("IMAGE_EXTENSIONS", "discover", "sample_shots", "open_rgb", "check_images",
                                "ImageList", "build_transforms"),
})
