"""The runtime: `ModelRunner` (the user API), the executor, scheduler, block manager and worker."""


def __getattr__(name):
    if name in ("ModelRunner", "GenerationOutput"):
        from dist_llm.runtime import model_runner

        return getattr(model_runner, name)
    raise AttributeError(name)
