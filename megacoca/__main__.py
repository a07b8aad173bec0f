from megacoca.cli import main
from megacoca.launch.process_group import exit_process

if __name__ == "__main__":
    exit_process(main())
