fn main() {
    std::process::exit(amqproxy::app::main());
}
