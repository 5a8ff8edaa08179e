from realflow.search.cli import main

raise SystemExit(main())
