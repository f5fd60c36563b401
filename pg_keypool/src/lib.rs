pub mod calendar;
pub mod outcome;
pub mod secret;
pub mod window;
