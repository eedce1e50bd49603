from sptun.cli import main

raise SystemExit(main())
