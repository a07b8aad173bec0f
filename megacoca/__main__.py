from megacoca.cli import main
from megacoca.train import exit_process

if __name__ == "__main__":
    exit_process(main())
