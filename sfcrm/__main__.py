from sfcrm.cli import main

main()
