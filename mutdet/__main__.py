from mutdet.cli import main

raise SystemExit(main())
