"""The application wing: what the ``demul-fast`` command runs.

* ``cli``: the command line (each subcommand's module imported when it runs);
* ``config``: ``TrainConfig``; ``runtime``: device, autocast dtype, progress messages;
* ``models``: loading the frozen CLIP model, building the trained module;
* ``train``: the training loop; ``evaluate``: features, top-1, a saved run's top-1;
* ``run_folder`` and ``checkpoint``: a run's files and its checkpoints, replaced as one unit;
* ``llm`` and ``phi_cache``: the LLM class-name embeddings and the fitted map phi, cached;
* ``processes``: torchrun's process group and the global-batch sampler;
* ``zeroshot``, ``sweep``: zero-shot CLIP and the paper's protocol.

The app imports the library (ops, modules) and the data wing; nothing below imports it.
"""
