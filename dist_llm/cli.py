"""What every entry point shares: user errors print one clear line and exit 2, never a traceback."""

from __future__ import annotations

import logging
import os
import sys

from dist_llm.errors import DistLLMError


def rank_prefix() -> str:
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID", "RANK"):
        if var in os.environ:
            return f"[rank {os.environ[var]}] "
    return ""


def run_main(main, argv=None) -> None:
    logging.basicConfig(level=os.environ.get("DIST_LLM_LOG_LEVEL", "INFO"), format="%(message)s")
    try:
        main(argv)
    except DistLLMError as e:
        sys.stderr.write(f"{rank_prefix()}error: {e}\n")
        sys.stderr.flush()
        # under MPI, one rank's error must end the job: exit at once, without waiting for peers
        os._exit(2)
    except KeyboardInterrupt:
        os._exit(130)
