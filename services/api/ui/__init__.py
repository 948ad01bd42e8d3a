"""The routing explorer: a small web page at ``/ui`` on the same API and admin key as everything else."""
