"""Runs on the paper's real video datasets: config, (clip, text) pair tasks, the run itself."""
