from lmsqueeze.cli import main

raise SystemExit(main())
