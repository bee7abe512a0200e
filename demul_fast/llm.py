"""Moved: the LLM class-name embeddings are ``demul_fast.app.llm`` (the class-name rule is
``demul_fast.data.classnames``). This stub keeps the old names for one release
(``demul_fast._moved``)."""

from ._moved import forward

__getattr__, __dir__ = forward(__name__, {
    "demul_fast.app.llm": ("EMBEDDINGS_KEY", "NAMES_KEY", "FILE_SUFFIXES", "minilm_path", "save_embeddings",
                           "read_embeddings_file", "load_embeddings", "sentence_transformer_embeddings",
                           "transformers_embeddings", "cache_dir", "class_name_embeddings"),
    "demul_fast.data.classnames": ("ClassNameMismatch", "display_name", "check_classnames"),
})
