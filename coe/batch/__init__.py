"""Batch jobs: OpenAI batch lines in, results out, run grouped by expert and resumable.

``lines`` parses and checks the input (every bad line reported, nothing run) and
shapes output lines; ``run`` executes items in one process with a crash-safe,
resumable result file; ``jobs``, ``queue`` and ``worker`` are the Batches API's
durable jobs; ``stages`` runs items in waves grouped by expert. The items run
through the request paths the API serves (``coe.runtime.ChatPaths.execute``);
the commands are in ``coe.cli_batch``.
"""

from coe.batch.lines import CHAT_URL, BatchItem, output_line, read_batch
from coe.batch.run import Progress, finished_ids, grouped, run_batch

__all__ = ["CHAT_URL", "BatchItem", "Progress", "finished_ids", "grouped", "output_line", "read_batch", "run_batch"]
