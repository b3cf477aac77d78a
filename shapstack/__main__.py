from shapstack.cli import main

main()
