"""qjax experiments: runnable studies built on the library."""
