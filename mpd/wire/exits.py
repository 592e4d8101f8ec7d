"""How a worker's exit status reads to its master: a boot error (the code or the config
cannot serve: back off) is not a crash of a worker that served (replace it at once)."""

EXIT_OK = 0
EXIT_CRASH = 1  # an exception escaped the loop after it served
EXIT_BOOT_ERROR = 3  # failed before serving, as gunicorn's 3: the master backs off
