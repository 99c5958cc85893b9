"""python -m app.tracking close-orphans ...: see app.tracking.backend.main."""
from app.tracking.backend import main

raise SystemExit(main())
