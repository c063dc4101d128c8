from bigpipe.cli import main

raise SystemExit(main())
