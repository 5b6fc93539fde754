"""Stream-side commands (worker, upload, tail, demo, backfill, evaluate)."""
def register(command):
    pass
