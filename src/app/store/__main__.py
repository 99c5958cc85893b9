"""python -m app.store info|clear: show or empty the stage cache (app.store.cache.main)."""
from app.store.cache import main

raise SystemExit(main())
